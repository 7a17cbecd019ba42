// Run configuration: TOML files with sections [model], [data], [optim], [train], [metrics], overridden by
// `--set section.key=value`. Key names follow the seed project's (train.max_steps,
// optim.learning_rate_muon, ...). An unknown key, a wrong type or a value out of its range
// (model.d_state >= 1, optim.adam_beta1 in [0, 1), train.seq_len >= 2, ...: each key's range sits
// beside it in the key table, launch/config.cpp) is an error naming the key and where its value came
// from ("<file>:<line>: ..." or "--set key=value: ..."), raised by load() before anything starts;
// so are the checks between keys (warmup <= max_steps, global batch a multiple of the micro batch).
// load() raises them as coil::ConfigError: `coil` then exits with status 2, and `coil launch` does not
// restart a job that failed so.
// The [model] shape keys left unset take the preset's values, so the resolved configuration,
// written into the run directory, names the whole shape.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace coil {

struct RunConfig {
  // [model]
  std::string model_preset = "tiny";
  int64_t model_vocab_size = 0;  // 0: the tokenizer's, padded to a multiple of 8
  // The preset's shape, unless set here (load() fills in the preset's; an explicit 0 is an error):
  // e.g. a model imported from Hugging Face. dt_rank 0: ceil(d_model / 16), as mamba_ssm's "auto".
  int64_t model_d_model = 0, model_n_layer = 0, model_d_state = 0, model_d_conv = 0, model_expand = 0,
          model_dt_rank = 0;
  double model_rms_eps = 0;

  // [data]
  // Prepared dirs (or JSONL globs when streaming / SFT); each comma-separated entry of data.val is a
  // held-out set of its own, scored apart.
  std::string data_train, data_val, data_tokenizer;
  // A mixture (data/mixture.h): with weights, each comma-separated entry of data.train is a part,
  // in these shares (e.g. "0.7,0.3"); without, several prepared directories mix in proportion to
  // their sizes, and several text inputs are one data set.
  std::string data_train_weights;
  std::vector<double> train_weights() const;      // parsed (checked by load()); empty when not set
  std::vector<std::string> train_parts() const;  // data.train's comma-separated entries
  // A comma-separated list's entries, trimmed, the empty ones left out (data.train, data.val).
  static std::vector<std::string> split_entries(const std::string& list);
  bool data_streaming = false;
  std::string data_text_field = "text";
  int64_t data_max_bad_records = 1000;
  // SFT: "alpaca", or a template of one's own with {instruction}, {input}, {response} slots, and
  // its variant for examples without an input ("": the template, {input} empty); data/sft.h.
  std::string data_sft_template = "alpaca", data_sft_template_no_input;
  bool data_document_masking = true;   // pretraining: Batch::seq_idx from the document boundaries
  bool data_sft_packing = true;        // SFT: several examples per row (data/sft.h PackedSftSamples)

  // [optim]
  double learning_rate_muon = 0.02, learning_rate_adamw = 3e-3;
  bool use_muon = true;
  std::string muon_scale = "keller";
  double muon_momentum = 0.95;
  bool muon_nesterov = true;
  int64_t muon_ns_steps = 5;
  double weight_decay = 0.1;
  double adam_beta1 = 0.9, adam_beta2 = 0.95, adam_eps = 1e-8;
  std::string schedule = "cosine";
  int64_t warmup_steps = 0;
  double min_lr_ratio = 0.1, decay_fraction = 0.2;
  double grad_clip = 1.0;

  // [train]
  std::string run_dir = "runs/default";
  int64_t max_steps = 0;
  bool train_by_epochs = false;
  int64_t num_epochs = 1;
  int64_t total_train_tokens = 0;
  int64_t seq_len = 256, global_batch_size = 8, micro_batch_size = 8;
  int64_t seed = 0;
  int64_t eval_interval = 100, eval_batches = 8;
  int64_t checkpoint_interval = 0;  // 0: at the end only
  int64_t keep_last_k = 0;          // step checkpoints kept (0: all); the linked ones always stay
  bool async_checkpoint = true;     // rank files written by a background thread while training goes on
  double watchdog_timeout = 1800;   // seconds without progress before the job is ended (0: no watchdog)
  int64_t log_interval = 1;
  std::string pretrained_checkpoint_path;  // SFT: the pretrained model
  std::string nan_policy = "stop";         // or "skip"
  int64_t threads = 0;                     // 0: all cores (under MPI: the node's cores / its ranks)
  int64_t data_parallel_shard_degree = 0;      // HSDP: ranks a parameter is sharded over (0: world / replicate)
  int64_t data_parallel_replicate_degree = 1;  // HSDP: groups holding full replicas (1: plain FSDP)
  bool reshard_after_forward = true;       // FSDP: free gathered weights after forward (ZeRO-3) or keep them (ZeRO-2)
  std::string device = "auto";             // "cuda": one GPU per rank (by local rank), NCCL between them;
                                           // "cpu"; "auto": cuda when the node has a GPU per rank, else cpu
  std::string dtype = "float32";           // compute dtype, or "bfloat16" / "float16" (float32 master weights and
                                           // optimizer state; float16 with dynamic loss scaling)
  double loss_scale_init = 65536;          // float16: the first loss scale (a power of two)
  int64_t loss_scale_growth_interval = 2000;  // float16: finite steps in a row before the scale doubles
  std::string reduce_dtype = "float32";    // FSDP gradient reduce-scatter: "float32" or "bfloat16"
  bool overlap_comm = true;                // CUDA: prefetch all-gathers, overlap reduce-scatters with backward
  std::string activation_checkpointing = "none";  // "full": each block recomputed in backward (sharded or not)

  // [metrics]: Weights & Biases, next to metrics.jsonl and TensorBoard (launch/wandb.h). An empty
  // project: no W&B.
  std::string wandb_project, wandb_entity;  // entity "": the account's default
  std::string wandb_run_name;               // "": the run directory's name
  std::string wandb_mode = "online";        // "offline": written under <run_dir>/wandb for `wandb sync`
  std::string wandb_python;                 // the python with wandb; "": $COIL_PYTHON, else the venv's
  // The dense peak of one device in TFLOP/s for the compute dtype (H100/H200 SXM bf16: 989), for
  // the MFU in metrics.jsonl, TensorBoard and W&B; 0: not known, no MFU.
  double peak_tflops = 0;

  // Reads a TOML file (its defaults are the ones above) and applies the overrides in order.
  static RunConfig load(const std::string& path, const std::vector<std::string>& overrides);
  // The same from TOML text (a checkpoint's config); origin names it in errors. A shape key of 0
  // there (written before the shape was resolved) is the preset's; only the [model] keys are
  // range-checked (the rest was checked when that run started).
  static RunConfig parse(const std::string& text, const std::string& origin);
  // Every key as TOML, with the values in force (written to <run_dir>/config.toml).
  std::string to_toml() const;
  // The model's shape: the preset with the [model] keys set here, and `vocab_size` rows.
  MambaConfig model_config(int64_t vocab_size) const;

  // The key table, for documentation and tests: "section.key", its type ("an integer", "a number",
  // "a string", "true or false"), the range of a number in words (">= 1", "in [0, 1)", or
  // "any: <why>" when unbounded on purpose; "not empty" for a string that must be set), the choices
  // of a string.
  struct Key {
    std::string name, type, range;
    std::vector<std::string> choices;
  };
  static std::vector<Key> keys();
};

}  // namespace coil

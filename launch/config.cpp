#include "launch/config.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include <functional>
#include <sstream>
#include <toml++/toml.h>
#include <variant>

#include "util/error.h"

namespace coil {
namespace {

using Target = std::variant<std::string*, int64_t*, double*, bool*>;

struct Field {
  std::string section, key;
  Target target;
  std::vector<std::string> choices = {};  // the values a string key may take (empty: any)
};

// Every key of the configuration and where its value goes.
std::vector<Field> fields(RunConfig& c) {
  return {
      {"model", "preset", &c.model_preset},
      {"model", "vocab_size", &c.model_vocab_size},
      {"model", "d_model", &c.model_d_model},
      {"model", "n_layer", &c.model_n_layer},
      {"model", "d_state", &c.model_d_state},
      {"model", "d_conv", &c.model_d_conv},
      {"model", "expand", &c.model_expand},
      {"model", "dt_rank", &c.model_dt_rank},
      {"model", "rms_eps", &c.model_rms_eps},
      {"data", "train", &c.data_train},
      {"data", "val", &c.data_val},
      {"data", "tokenizer", &c.data_tokenizer},
      {"data", "streaming", &c.data_streaming},
      {"data", "text_field", &c.data_text_field},
      {"data", "max_bad_records", &c.data_max_bad_records},
      {"optim", "learning_rate_muon", &c.learning_rate_muon},
      {"optim", "learning_rate_adamw", &c.learning_rate_adamw},
      {"optim", "use_muon", &c.use_muon},
      {"optim", "muon_scale", &c.muon_scale},
      {"optim", "muon_momentum", &c.muon_momentum},
      {"optim", "muon_nesterov", &c.muon_nesterov},
      {"optim", "muon_ns_steps", &c.muon_ns_steps},
      {"optim", "weight_decay", &c.weight_decay},
      {"optim", "adam_beta1", &c.adam_beta1},
      {"optim", "adam_beta2", &c.adam_beta2},
      {"optim", "adam_eps", &c.adam_eps},
      {"optim", "schedule", &c.schedule},
      {"optim", "warmup_steps", &c.warmup_steps},
      {"optim", "min_lr_ratio", &c.min_lr_ratio},
      {"optim", "decay_fraction", &c.decay_fraction},
      {"optim", "grad_clip", &c.grad_clip},
      {"train", "run_dir", &c.run_dir},
      {"train", "max_steps", &c.max_steps},
      {"train", "train_by_epochs", &c.train_by_epochs},
      {"train", "num_epochs", &c.num_epochs},
      {"train", "total_train_tokens", &c.total_train_tokens},
      {"train", "seq_len", &c.seq_len},
      {"train", "global_batch_size", &c.global_batch_size},
      {"train", "micro_batch_size", &c.micro_batch_size},
      {"train", "seed", &c.seed},
      {"train", "eval_interval", &c.eval_interval},
      {"train", "eval_batches", &c.eval_batches},
      {"train", "checkpoint_interval", &c.checkpoint_interval},
      {"train", "keep_last_k", &c.keep_last_k},
      {"train", "async_checkpoint", &c.async_checkpoint},
      {"train", "watchdog_timeout", &c.watchdog_timeout},
      {"train", "log_interval", &c.log_interval},
      {"train", "pretrained_checkpoint_path", &c.pretrained_checkpoint_path},
      {"train", "nan_policy", &c.nan_policy},
      {"train", "threads", &c.threads},
      {"train", "reshard_after_forward", &c.reshard_after_forward},
      {"train", "device", &c.device, {"auto", "cpu", "cuda"}},
      {"train", "dtype", &c.dtype, {"float32", "bfloat16", "float16"}},
      {"train", "loss_scale_init", &c.loss_scale_init},
      {"train", "loss_scale_growth_interval", &c.loss_scale_growth_interval},
      {"train", "reduce_dtype", &c.reduce_dtype, {"float32", "bfloat16"}},
      {"train", "overlap_comm", &c.overlap_comm},
      {"train", "activation_checkpointing", &c.activation_checkpointing, {"none", "full"}},
  };
}

const char* type_name(const Target& t) {
  return std::visit(
      [](auto* p) -> const char* {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, std::string>) return "a string";
        if constexpr (std::is_same_v<T, int64_t>) return "an integer";
        if constexpr (std::is_same_v<T, double>) return "a number";
        return "true or false";
      },
      t);
}

// Sets the field from a TOML node, or fails with `where` and the expected type.
void assign(const Field& f, const toml::node& node, const std::string& where) {
  const std::string key = f.section + "." + f.key;
  bool ok = std::visit(
      [&](auto* p) {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, double>) {
          if (auto v = node.value<double>(); v && (node.is_floating_point() || node.is_integer())) return *p = *v, true;
        } else if constexpr (std::is_same_v<T, int64_t>) {
          if (node.is_integer()) return *p = *node.value<int64_t>(), true;
        } else if constexpr (std::is_same_v<T, bool>) {
          if (node.is_boolean()) return *p = *node.value<bool>(), true;
        } else {
          if (node.is_string()) return *p = *node.value<std::string>(), true;
        }
        return false;
      },
      f.target);
  if (!ok) fail("{}: {} must be {}", where, key, type_name(f.target));
  if (!f.choices.empty()) {
    const std::string& v = *std::get<std::string*>(f.target);
    if (std::find(f.choices.begin(), f.choices.end(), v) == f.choices.end())
      fail("{}: {} must be \"{}\", not \"{}\"", where, key, fmt::format("{}", fmt::join(f.choices, "\" or \"")), v);
  }
}

std::string location(const std::string& path, const toml::node& node) {
  return fmt::format("{}:{}", path, node.source().begin.line);
}

}  // namespace

namespace {

// Sets the fields named in a parsed TOML document; `origin` names it in errors (a path).
void apply(std::vector<Field>& all, const toml::table& doc, const std::string& path) {
  auto find = [&](const std::string& section, const std::string& key) -> const Field* {
    for (const Field& f : all)
      if (f.section == section && f.key == key) return &f;
    return nullptr;
  };
  for (auto&& [section, node] : doc) {
    const std::string s(section.str());
    if (!node.is_table()) fail("{}: {} is not a section ([model], [data], [optim], [train])", location(path, node), s);
    if (s != "model" && s != "data" && s != "optim" && s != "train")
      fail("{}: unknown section [{}] (sections: model, data, optim, train)", location(path, node), s);
    for (auto&& [key, value] : *node.as_table()) {
      const Field* f = find(s, std::string(key.str()));
      if (!f) fail("{}: unknown key {}.{}", location(path, value), s, key.str());
      assign(*f, value, location(path, value));
    }
  }
}

}  // namespace

RunConfig RunConfig::parse(const std::string& text, const std::string& origin) {
  RunConfig c;
  std::vector<Field> all = fields(c);
  try {
    apply(all, toml::parse(text, origin), origin);
  } catch (const toml::parse_error& e) {
    fail("{}:{}: {}", origin, e.source().begin.line, e.description());
  }
  return c;
}

RunConfig RunConfig::load(const std::string& path, const std::vector<std::string>& overrides) {
  RunConfig c;
  std::vector<Field> all = fields(c);
  auto find = [&](const std::string& section, const std::string& key) -> const Field* {
    for (const Field& f : all)
      if (f.section == section && f.key == key) return &f;
    return nullptr;
  };
  if (!path.empty()) {
    toml::table doc;
    try {
      doc = toml::parse_file(path);
    } catch (const toml::parse_error& e) {
      if (e.source().begin.line == 0) fail("cannot read config {}: {}", path, e.description());
      fail("{}:{}: {}", path, e.source().begin.line, e.description());
    }
    apply(all, doc, path);
  }
  for (const std::string& o : overrides) {
    const size_t eq = o.find('='), dot = o.find('.');
    if (eq == std::string::npos || dot == std::string::npos || dot > eq)
      fail("--set {}: expected section.key=value", o);
    const std::string section = o.substr(0, dot), key = o.substr(dot + 1, eq - dot - 1), value = o.substr(eq + 1);
    const Field* f = find(section, key);
    if (!f) fail("--set {}: unknown key {}.{}", o, section, key);
    // The value is read as TOML (42, 3e-4, true, "text"); a bare word is a string.
    toml::table t;
    try {
      t = toml::parse("v = " + value);
    } catch (const toml::parse_error&) {
      t = toml::table{{"v", value}};
    }
    if (std::holds_alternative<std::string*>(f->target) && !t["v"].is_string()) t = toml::table{{"v", value}};
    assign(*f, *t.get("v"), "--set " + o);
  }
  return c;
}

MambaConfig RunConfig::model_config(int64_t vocab_size) const {
  MambaConfig m = MambaConfig::preset(model_preset);
  const std::pair<int64_t, int64_t*> keys[] = {{model_d_model, &m.d_model}, {model_n_layer, &m.n_layer},
                                               {model_d_state, &m.d_state}, {model_d_conv, &m.d_conv},
                                               {model_expand, &m.expand},   {model_dt_rank, &m.dt_rank}};
  for (const auto& [value, field] : keys) {
    COIL_CHECK(value >= 0, "model: shape keys must be >= 0 (0: the preset's), got {}", value);
    if (value > 0) *field = value;
  }
  COIL_CHECK(model_rms_eps >= 0, "model.rms_eps must be >= 0 (0: the preset's), got {}", model_rms_eps);
  if (model_rms_eps > 0) m.rms_eps = model_rms_eps;
  m.vocab_size = vocab_size;
  m.validate();
  return m;
}

std::string RunConfig::to_toml() const {
  RunConfig copy = *this;
  toml::table doc;
  for (const Field& f : fields(copy)) {
    if (!doc.contains(f.section)) doc.insert(f.section, toml::table{});
    toml::table& t = *doc[f.section].as_table();
    std::visit([&](auto* p) { t.insert(f.key, *p); }, f.target);
  }
  std::ostringstream out;
  out << doc << "\n";
  return out.str();
}

}  // namespace coil

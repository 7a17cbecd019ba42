#include "launch/config.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <toml++/toml.h>
#include <variant>

#include "data/sft.h"
#include "util/error.h"

namespace coil {
namespace {

using Target = std::variant<std::string*, int64_t*, double*, bool*>;

// The values a numeric key may take: an interval (each end open or closed, or none), checked once
// every file line and --set has been applied, so that an error names where the bad value came from.
// Every number must also be finite (TOML reads inf and nan). A numeric key without a range says why.
struct Range {
  double lo = -HUGE_VAL, hi = HUGE_VAL;
  bool lo_open = false, hi_open = false;
  std::string note;  // what a special value means, e.g. "(0: no watchdog)"
  bool any = false;  // unbounded on purpose (note says why)
  bool contains(double v) const {
    return (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  }
  std::string words() const {
    if (any) return "";
    if (hi == HUGE_VAL) return fmt::format("{} {}", lo_open ? ">" : ">=", lo);
    return fmt::format("in {}{}, {}{}", lo_open ? "(" : "[", lo, hi, hi_open ? ")" : "]");
  }
};
Range at_least(double lo, std::string note = "") { return {lo, HUGE_VAL, false, false, std::move(note)}; }
Range above(double lo, std::string note = "") { return {lo, HUGE_VAL, true, false, std::move(note)}; }
Range between(double lo, double hi, bool lo_open, bool hi_open) { return {lo, hi, lo_open, hi_open, ""}; }
Range unbounded(std::string why) { return {-HUGE_VAL, HUGE_VAL, false, false, std::move(why), true}; }

struct Field {
  std::string section, key;
  Target target;
  std::vector<std::string> choices = {};  // the values a string key may take (empty: any)
  Range range = unbounded("");            // numbers only
  bool nonempty = false;                  // strings only: "" is an error
  bool shape = false;                     // [model] shape key: unset means the preset's (resolved in finish())
  bool wandb_name = false;                // strings only: a W&B project or entity (none of / \ # ? % :)
};

// Every key of the configuration, where its value goes and the values it may take.
std::vector<Field> fields(RunConfig& c) {
  const std::vector<std::string> any;
  return {
      {"model", "preset", &c.model_preset, MambaConfig::preset_names()},
      {"model", "vocab_size", &c.model_vocab_size, any, at_least(0, "(0: the tokenizer's)")},
      {"model", "d_model", &c.model_d_model, any, at_least(1), false, true},
      {"model", "n_layer", &c.model_n_layer, any, at_least(1), false, true},
      {"model", "d_state", &c.model_d_state, any, at_least(1), false, true},
      {"model", "d_conv", &c.model_d_conv, any, at_least(1), false, true},
      {"model", "expand", &c.model_expand, any, at_least(1), false, true},
      {"model", "dt_rank", &c.model_dt_rank, any, at_least(0, "(0: ceil(d_model / 16))")},
      {"model", "rms_eps", &c.model_rms_eps, any, above(0), false, true},
      {"data", "train", &c.data_train},
      {"data", "train_weights", &c.data_train_weights},
      {"data", "val", &c.data_val},
      {"data", "tokenizer", &c.data_tokenizer},
      {"data", "streaming", &c.data_streaming},
      {"data", "text_field", &c.data_text_field, any, {}, true},
      {"data", "max_bad_records", &c.data_max_bad_records, any, at_least(0)},
      {"data", "sft_template", &c.data_sft_template, any, {}, true},
      {"data", "sft_template_no_input", &c.data_sft_template_no_input},
      {"data", "document_masking", &c.data_document_masking},
      {"data", "sft_packing", &c.data_sft_packing},
      {"optim", "learning_rate_muon", &c.learning_rate_muon, any, at_least(0)},
      {"optim", "learning_rate_adamw", &c.learning_rate_adamw, any, at_least(0)},
      {"optim", "use_muon", &c.use_muon},
      {"optim", "muon_scale", &c.muon_scale, {"keller", "moonlight"}},
      {"optim", "muon_momentum", &c.muon_momentum, any, between(0, 1, false, true)},
      {"optim", "muon_nesterov", &c.muon_nesterov},
      {"optim", "muon_ns_steps", &c.muon_ns_steps, any, at_least(1)},
      {"optim", "weight_decay", &c.weight_decay, any, at_least(0)},
      {"optim", "adam_beta1", &c.adam_beta1, any, between(0, 1, false, true)},
      {"optim", "adam_beta2", &c.adam_beta2, any, between(0, 1, false, true)},
      {"optim", "adam_eps", &c.adam_eps, any, above(0)},
      {"optim", "schedule", &c.schedule, {"cosine", "wsd", "constant"}},
      {"optim", "warmup_steps", &c.warmup_steps, any, at_least(0)},
      {"optim", "min_lr_ratio", &c.min_lr_ratio, any, between(0, 1, false, false)},
      {"optim", "decay_fraction", &c.decay_fraction, any, between(0, 1, true, false)},
      {"optim", "grad_clip", &c.grad_clip, any, at_least(0, "(0: no clipping)")},
      {"train", "run_dir", &c.run_dir, any, {}, true},
      {"train", "max_steps", &c.max_steps, any, at_least(0, "(0: with train.train_by_epochs)")},
      {"train", "train_by_epochs", &c.train_by_epochs},
      {"train", "num_epochs", &c.num_epochs, any, at_least(1)},
      {"train", "total_train_tokens", &c.total_train_tokens, any, at_least(0, "(0: from train.num_epochs)")},
      {"train", "seq_len", &c.seq_len, any, at_least(2)},
      {"train", "global_batch_size", &c.global_batch_size, any, at_least(1)},
      {"train", "micro_batch_size", &c.micro_batch_size, any, at_least(1)},
      {"train", "seed", &c.seed, any, unbounded("any integer: its 64 bits seed the generators")},
      {"train", "eval_interval", &c.eval_interval, any, at_least(0, "(0: no evaluation)")},
      {"train", "eval_batches", &c.eval_batches, any, at_least(1)},
      {"train", "checkpoint_interval", &c.checkpoint_interval, any, at_least(0, "(0: at the end only)")},
      {"train", "keep_last_k", &c.keep_last_k, any, at_least(0, "(0: all)")},
      {"train", "async_checkpoint", &c.async_checkpoint},
      {"train", "watchdog_timeout", &c.watchdog_timeout, any, at_least(0, "(0: no watchdog)")},
      {"train", "log_interval", &c.log_interval, any, at_least(1)},
      {"train", "pretrained_checkpoint_path", &c.pretrained_checkpoint_path},
      {"train", "nan_policy", &c.nan_policy, {"stop", "skip"}},
      {"train", "threads", &c.threads, any, at_least(0, "(0: all cores)")},
      {"train", "reshard_after_forward", &c.reshard_after_forward},
      {"train", "data_parallel_shard_degree", &c.data_parallel_shard_degree, any, at_least(0, "(0: the world size / the replicate degree)")},
      {"train", "data_parallel_replicate_degree", &c.data_parallel_replicate_degree, any, at_least(1)},
      {"train", "device", &c.device, {"auto", "cpu", "cuda"}},
      {"train", "dtype", &c.dtype, {"float32", "bfloat16", "float16"}},
      {"train", "loss_scale_init", &c.loss_scale_init, any, at_least(1, "(a power of two)")},
      {"train", "loss_scale_growth_interval", &c.loss_scale_growth_interval, any, at_least(1)},
      {"train", "reduce_dtype", &c.reduce_dtype, {"float32", "bfloat16"}},
      {"train", "overlap_comm", &c.overlap_comm},
      {"train", "activation_checkpointing", &c.activation_checkpointing, {"none", "full"}},
      {"metrics", "wandb_project", &c.wandb_project, any, {}, false, false, true},
      {"metrics", "wandb_entity", &c.wandb_entity, any, {}, false, false, true},
      {"metrics", "wandb_run_name", &c.wandb_run_name},
      {"metrics", "wandb_mode", &c.wandb_mode, {"online", "offline", "disabled"}},
      {"metrics", "wandb_python", &c.wandb_python},
      {"metrics", "peak_tflops", &c.peak_tflops, any, at_least(0, "(0: not known, no MFU)")},
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

// toml++ 3.3.0 (Debian 12) reaches __builtin_unreachable, undefined behaviour, when it asks whether
// some non-ASCII characters (U+00A1 to U+0499 among them: 'é', Cyrillic) are whitespace
// (docs/RELIABILITY.md, finding 6). It asks that only outside strings and comments, where TOML 1.0
// allows no non-ASCII character anyway (a quote glued to a bare value, as in 0"é", opens no string
// for toml++: see `bare` below), and at two places inside basic strings: right after a
// backslash (no escape allows a non-ASCII character there) and at the first character after a
// multi-line string's line-ending backslash. So text goes to toml++ only once this scanner found
// no non-ASCII byte in those places; it follows TOML's lexical structure just that far: comments
// (# to the line's end), basic "..." and literal '...' strings (ended by a newline when unclosed:
// toml++ stops there with its own error), multi-line """...""" and '''...''' strings (a run of up
// to five quotes closes one), and backslash escapes. Returns "" or the one-line error:
// "<origin>:<line>:<column>: ..." (the column counts characters, from 1).
std::string non_ascii_outside_strings(std::string_view text, const std::string& origin) {
  enum class In { kCode, kComment, kBasic, kLiteral, kMultiBasic, kMultiLiteral };
  In in = In::kCode;
  // Outside strings: the brackets open ('[' array, '{' inline table, 'h' table header), whether a
  // value comes next (after '=', in an array), and whether a bare value is being read. toml++ reads
  // a bare value (a number, a boolean, a date) by looking ahead to the next terminator (whitespace,
  // ] } , #), asking of every character on the way whether it is whitespace, quotes included: so
  // there a quote opens no string, and a non-ASCII character after it is refused.
  std::vector<char> nest;
  bool value = false, bare = false;
  auto in_array = [&] { return !nest.empty() && nest.back() == '['; };
  size_t i = text.compare(0, 3, "\xEF\xBB\xBF") == 0 ? 3 : 0;  // a byte order mark (toml++ skips it)
  int64_t line = 1, column = 1;
  auto advance = [&](size_t n = 1) {
    for (; n > 0 && i < text.size(); --n, ++i) {
      const auto c = static_cast<unsigned char>(text[i]);
      if (c == '\n') ++line, column = 1;
      else if ((c & 0xC0) != 0x80) ++column;  // not a UTF-8 continuation byte: a new character
    }
  };
  auto at = [&](const char* s) { return text.compare(i, std::strlen(s), s) == 0; };
  auto refuse = [&](const char* where) {
    // The character, as U+XXXX when it is valid UTF-8, else its first byte.
    const auto* p = reinterpret_cast<const unsigned char*>(text.data() + i);
    const size_t left = text.size() - i;
    const int len = p[0] >= 0xF0 && p[0] < 0xF5 ? 4 : p[0] >= 0xE0 ? 3 : p[0] >= 0xC2 && p[0] < 0xE0 ? 2 : 0;
    uint32_t cp = len == 4 ? p[0] & 0x07u : len == 3 ? p[0] & 0x0Fu : p[0] & 0x1Fu;
    bool valid = len > 0 && static_cast<size_t>(len) <= left;
    for (int k = 1; valid && k < len; ++k) {
      valid = (p[k] & 0xC0) == 0x80;
      cp = cp << 6 | (p[k] & 0x3Fu);
    }
    const std::string what = valid ? fmt::format("the character U+{:04X}", cp) : fmt::format("the byte 0x{:02X}", p[0]);
    return fmt::format("{}:{}:{}: {} {} (TOML allows non-ASCII characters only inside strings and comments)",
                       origin, line, column, what, where);
  };
  // After a backslash in a basic string: the escaped character, or a line-ending backslash's
  // spaces, newline and the next line's leading whitespace. "" or the error.
  auto escape = [&](bool multi_line) -> std::string {
    advance();  // the backslash
    size_t j = i;
    while (j < text.size() && (text[j] == ' ' || text[j] == '\t')) ++j;
    if (j < text.size() && static_cast<unsigned char>(text[j]) >= 0x80) {
      advance(j - i);
      return refuse("after a backslash");
    }
    if (!multi_line || j == text.size() || (text[j] != '\n' && text[j] != '\r')) {
      if (i < text.size() && text[i] != '\n') advance();  // the escaped character (a newline ends the string)
      return {};
    }
    while (j < text.size() && (text[j] == ' ' || text[j] == '\t' || text[j] == '\n' || text[j] == '\r')) ++j;
    advance(j - i);
    if (i < text.size() && static_cast<unsigned char>(text[i]) >= 0x80)
      return refuse("first after a line-ending backslash (toml++ 3.3 misreads it there; put an ASCII character first)");
    return {};
  };
  while (i < text.size()) {
    const auto c = static_cast<unsigned char>(text[i]);
    switch (in) {
      case In::kCode:
        if (c >= 0x80) return refuse("outside a string or comment");
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == ']' || c == '}' || c == ',' || c == '#') bare = false;
        if (bare) {  // toml++'s look-ahead over a bare value: a quote here opens no string
          advance();
          break;
        }
        if (c == '#') {
          in = In::kComment;
        } else if (c == '"' || c == '\'') {
          const bool multi = at(c == '"' ? "\"\"\"" : "'''");
          in = c == '"' ? (multi ? In::kMultiBasic : In::kBasic) : (multi ? In::kMultiLiteral : In::kLiteral);
          if (multi) advance(2);
          value = false;
        } else if (c == '\n') {
          value = value && in_array();  // a key/value pair ends with its line; an array may go on
        } else if (c == '=') {
          value = true;
        } else if (c == '[') {
          nest.push_back(value ? '[' : 'h');  // an array (its first element next), or a table header
        } else if (c == '{') {
          nest.push_back('{'), value = false;  // an inline table: a key next
        } else if (c == ']' || c == '}') {
          if (!nest.empty()) nest.pop_back();
          value = false;
        } else if (c == ',') {
          value = in_array();  // the next element, or an inline table's next key
        } else if (c != ' ' && c != '\t' && c != '\r' && value) {
          bare = true, value = false;  // a number, boolean or date: toml++ scans it to a terminator
        }
        advance();
        break;
      case In::kComment:
        if (c == '\n') in = In::kCode, value = value && in_array();
        advance();
        break;
      case In::kBasic:
      case In::kMultiBasic:
        if (c == '\\') {
          if (std::string e = escape(in == In::kMultiBasic); !e.empty()) return e;
          break;
        }
        if (in == In::kBasic ? c == '"' || c == '\n' : at("\"\"\"")) {
          if (in == In::kMultiBasic)
            for (int k = 0; k < 5 && i < text.size() && text[i] == '"'; ++k) advance();
          else
            advance();
          in = In::kCode;
          break;
        }
        advance();
        break;
      case In::kLiteral:
        if (c == '\'' || c == '\n') in = In::kCode;
        advance();
        break;
      case In::kMultiLiteral:
        if (at("'''")) {
          for (int k = 0; k < 5 && i < text.size() && text[i] == '\''; ++k) advance();
          in = In::kCode;
          break;
        }
        advance();
        break;
    }
  }
  return {};
}

// toml::parse of `text` (named `origin` in errors), once non_ascii_outside_strings found it safe.
toml::table parse_toml(const std::string& text, const std::string& origin) {
  if (std::string e = non_ascii_outside_strings(text, origin); !e.empty()) fail("{}", e);
  try {
    return toml::parse(text, origin);
  } catch (const toml::parse_error& e) {
    fail("{}:{}: {}", origin, e.source().begin.line, e.description());
  }
}

}  // namespace

namespace {

// Where each key got its value: "<file>:<line>" or "--set <override>" (the last one applied), and
// in which order, so that a check between two keys names the one set last.
struct Origins {
  std::map<std::string, std::pair<int, std::string>> of;
  int count = 0;
  void set(const Field& f, const std::string& where) { of[f.section + "." + f.key] = {++count, where}; }
  bool has(const std::string& key) const { return of.count(key) > 0; }
  std::string where(const std::string& key) const { return has(key) ? of.at(key).second : "the defaults"; }
  // Of two keys, where the later-set one was set.
  std::string where(const std::string& a, const std::string& b) const {
    const int ia = has(a) ? of.at(a).first : 0, ib = has(b) ? of.at(b).first : 0;
    return where(ia >= ib ? a : b);
  }
};

// Sets the fields named in a parsed TOML document; `origin` names it in errors (a path).
void apply(std::vector<Field>& all, const toml::table& doc, const std::string& path, Origins& origins) {
  auto find = [&](const std::string& section, const std::string& key) -> const Field* {
    for (const Field& f : all)
      if (f.section == section && f.key == key) return &f;
    return nullptr;
  };
  for (auto&& [section, node] : doc) {
    const std::string s(section.str());
    if (!node.is_table())
      fail("{}: {} is not a section ([model], [data], [optim], [train], [metrics])", location(path, node), s);
    if (s != "model" && s != "data" && s != "optim" && s != "train" && s != "metrics")
      fail("{}: unknown section [{}] (sections: model, data, optim, train, metrics)", location(path, node), s);
    for (auto&& [key, value] : *node.as_table()) {
      const Field* f = find(s, std::string(key.str()));
      if (!f) fail("{}: unknown key {}.{}", location(path, value), s, key.str());
      assign(*f, value, location(path, value));
      origins.set(*f, location(path, value));
    }
  }
}

// A comma-separated list's entries, trimmed, the empty ones left out (as data::expand_inputs splits).
std::vector<std::string> split_list(const std::string& train) {
  std::vector<std::string> out;
  std::stringstream in(train);
  for (std::string e; std::getline(in, e, ',');)
    if (const size_t b = e.find_first_not_of(' '); b != std::string::npos)
      out.push_back(e.substr(b, e.find_last_not_of(' ') - b + 1));
  return out;
}

// data.train_weights: comma-separated numbers, each finite and > 0; `problem` says what is wrong.
std::vector<double> parse_weights(const std::string& text, std::string& problem) {
  std::vector<double> out;
  for (const std::string& entry : split_list(text)) {
    char* end = nullptr;
    errno = 0;
    const double v = std::strtod(entry.c_str(), &end);
    if (end == entry.c_str() || *end != '\0' || errno == ERANGE || !std::isfinite(v) || v <= 0) {
      problem = fmt::format("must be numbers > 0 separated by commas (e.g. \"0.7,0.3\"), not \"{}\"", entry);
      return {};
    }
    out.push_back(v);
  }
  if (out.empty()) problem = "holds no number";
  return out;
}

// Once every value is in: the [model] shape keys left unset take the preset's values (so that
// config.toml names the whole shape), then every key is range-checked, then the checks between
// keys. `checkpoint`: a checkpoint's config (it was checked when its run started): a shape key of 0
// there (from before the shape was written out) is the preset's, and only the [model] keys are
// checked (what its readers use; a rule about training added since must not lock its weights away).
void finish(RunConfig& c, std::vector<Field>& all, const Origins& origins, bool checkpoint) {
  const MambaConfig preset = MambaConfig::preset(c.model_preset);
  const std::map<const void*, double> preset_value = {
      {&c.model_d_model, preset.d_model}, {&c.model_n_layer, preset.n_layer}, {&c.model_d_state, preset.d_state},
      {&c.model_d_conv, preset.d_conv},   {&c.model_expand, preset.expand},   {&c.model_rms_eps, preset.rms_eps}};
  for (const Field& f : all) {
    if (!f.shape || (origins.has(f.section + "." + f.key) && !checkpoint)) continue;
    std::visit(
        [&](auto* p) {
          using T = std::remove_pointer_t<decltype(p)>;
          if constexpr (std::is_same_v<T, int64_t> || std::is_same_v<T, double>)
            if (*p == 0) *p = static_cast<T>(preset_value.at(p));
        },
        f.target);
  }
  for (const Field& f : all) {
    if (checkpoint && f.section != "model") continue;
    const std::string key = f.section + "." + f.key, where = origins.where(key);
    std::visit(
        [&](auto* p) {
          using T = std::remove_pointer_t<decltype(p)>;
          if constexpr (std::is_same_v<T, std::string>) {
            if (f.nonempty && p->empty()) fail("{}: {} must not be empty", where, key);
            if (f.wandb_name && p->find_first_of("/\\#?%:") != std::string::npos)
              fail("{}: {} must be a W&B name (none of / \\ # ? % :), not \"{}\"", where, key, *p);
            if (f.wandb_name && p->size() > 128)
              fail("{}: {} must be a W&B name (at most 128 characters), not {} characters", where, key, p->size());
          } else if constexpr (!std::is_same_v<T, bool>) {
            const double v = static_cast<double>(*p);
            if (!std::isfinite(v)) fail("{}: {} must be a finite number, not {}", where, key, v);
            if (!f.range.contains(v))
              fail("{}: {} must be {}{}, not {}", where, key, f.range.words(),
                   f.range.note.empty() ? "" : " " + f.range.note, *p);
          }
        },
        f.target);
  }
  if (checkpoint) return;
  if (c.data_sft_template != "alpaca")
    if (const std::string p = data::SftTemplate::problem(c.data_sft_template, false); !p.empty())
      fail("{}: data.sft_template {} (it is \"alpaca\" or a template with the slots {{instruction}}, {{input}}, "
           "{{response}})", origins.where("data.sft_template"), p);
  if (!c.data_sft_template_no_input.empty()) {
    const std::string where = origins.where("data.sft_template_no_input");
    if (c.data_sft_template == "alpaca")
      fail("{}: data.sft_template_no_input is for a template of one's own (data.sft_template is \"alpaca\")", where);
    if (const std::string p = data::SftTemplate::problem(c.data_sft_template_no_input, true); !p.empty())
      fail("{}: data.sft_template_no_input {}", where, p);
  }
  if (!c.data_train_weights.empty()) {
    std::string problem;
    const std::vector<double> w = parse_weights(c.data_train_weights, problem);
    if (!problem.empty()) fail("{}: data.train_weights {}", origins.where("data.train_weights"), problem);
    const size_t parts = split_list(c.data_train).size();
    if (parts < 2 || parts != w.size())
      fail("{}: data.train_weights gives {} weight(s) for data.train's {} comma-separated part(s): a mixture needs two "
           "or more, a weight each", origins.where("data.train_weights", "data.train"), w.size(), parts);
  }
  const double s = c.loss_scale_init;
  if (std::ldexp(1.0, std::ilogb(s)) != s)
    fail("{}: train.loss_scale_init must be a power of two (unscaling is then exact), not {}",
         origins.where("train.loss_scale_init"), s);
  if (c.global_batch_size % c.micro_batch_size != 0)
    fail("{}: train.global_batch_size ({}) must be a multiple of train.micro_batch_size ({})",
         origins.where("train.global_batch_size", "train.micro_batch_size"), c.global_batch_size, c.micro_batch_size);
  // With train.train_by_epochs the steps are known once the data is open (Schedule::validate).
  if (!c.train_by_epochs && c.max_steps > 0 && c.warmup_steps > c.max_steps)
    fail("{}: optim.warmup_steps ({}) must be <= train.max_steps ({})",
         origins.where("optim.warmup_steps", "train.max_steps"), c.warmup_steps, c.max_steps);
}

}  // namespace

std::vector<std::string> RunConfig::train_parts() const { return split_list(data_train); }

std::vector<std::string> RunConfig::split_entries(const std::string& list) { return split_list(list); }

std::vector<double> RunConfig::train_weights() const {
  std::string problem;
  if (data_train_weights.empty()) return {};
  std::vector<double> w = parse_weights(data_train_weights, problem);
  if (!problem.empty()) fail("data.train_weights {}", problem);
  return w;
}

RunConfig RunConfig::parse(const std::string& text, const std::string& origin) {
  RunConfig c;
  std::vector<Field> all = fields(c);
  Origins origins;
  apply(all, parse_toml(text, origin), origin, origins);
  finish(c, all, origins, /*checkpoint=*/true);
  return c;
}

namespace {

RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  RunConfig c;
  std::vector<Field> all = fields(c);
  Origins origins;
  auto find = [&](const std::string& section, const std::string& key) -> const Field* {
    for (const Field& f : all)
      if (f.section == section && f.key == key) return &f;
    return nullptr;
  };
  if (!path.empty()) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) fail("cannot read config {}: a directory", path);
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("cannot read config {}: {}", path, std::strerror(errno));
    const std::string text{std::istreambuf_iterator<char>(in), {}};
    if (in.bad()) fail("cannot read config {}: {}", path, std::strerror(errno));
    apply(all, parse_toml(text, path), path, origins);
  }
  for (const std::string& o : overrides) {
    const size_t eq = o.find('='), dot = o.find('.');
    if (eq == std::string::npos || dot == std::string::npos || dot > eq)
      fail("--set {}: expected section.key=value", o);
    const std::string section = o.substr(0, dot), key = o.substr(dot + 1, eq - dot - 1), value = o.substr(eq + 1);
    const Field* f = find(section, key);
    if (!f) fail("--set {}: unknown key {}.{}", o, section, key);
    // The value is read as TOML (42, 3e-4, true, "text"); a bare word is a string, and so is a
    // value with a non-ASCII character outside quotes (café), which toml++ is not given
    // (non_ascii_outside_strings).
    toml::table t{{"v", value}};
    if (non_ascii_outside_strings("v = " + value, "--set").empty()) {
      try {
        t = toml::parse("v = " + value);
      } catch (const toml::parse_error&) {
      }
    }
    if (std::holds_alternative<std::string*>(f->target) && !t["v"].is_string()) t = toml::table{{"v", value}};
    assign(*f, *t.get("v"), "--set " + o);
    origins.set(*f, "--set " + o);
  }
  finish(c, all, origins, /*checkpoint=*/false);
  return c;
}

}  // namespace

// Every error here is the configuration's: a ConfigError (`coil` exits with kConfigErrorExit).
RunConfig RunConfig::load(const std::string& path, const std::vector<std::string>& overrides) {
  try {
    return load_config(path, overrides);
  } catch (const ConfigError&) {
    throw;
  } catch (const Error& e) {
    throw ConfigError(e.what());
  }
}

std::vector<RunConfig::Key> RunConfig::keys() {
  RunConfig c;
  std::vector<Key> out;
  for (const Field& f : fields(c)) {
    Key k{f.section + "." + f.key, type_name(f.target), "", f.choices};
    if (std::holds_alternative<int64_t*>(f.target) || std::holds_alternative<double*>(f.target))
      k.range = f.range.any ? "any: " + f.range.note : f.range.words();
    else if (f.nonempty)
      k.range = "not empty";
    else if (f.wandb_name)
      k.range = "a W&B name: none of / \\ # ? % :, at most 128 characters";
    out.push_back(k);
  }
  return out;
}

MambaConfig RunConfig::model_config(int64_t vocab_size) const {
  MambaConfig m = MambaConfig::preset(model_preset);
  const std::pair<int64_t, int64_t*> keys[] = {{model_d_model, &m.d_model}, {model_n_layer, &m.n_layer},
                                               {model_d_state, &m.d_state}, {model_d_conv, &m.d_conv},
                                               {model_expand, &m.expand},   {model_dt_rank, &m.dt_rank}};
  for (const auto& [value, field] : keys) {
    COIL_CHECK(value >= 0, "model: shape keys must be >= 0 (0: the preset's), not {}", value);
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
  // Basic strings only ("...", escaped): toml++ 3.3 writes a string holding a newline as a
  // multi-line literal string even when it holds ''' too, which does not parse back (libFuzzer, the
  // to_toml round trip: corpus/config/to-toml-triple-quote.toml).
  constexpr auto basic_strings_only = toml::toml_formatter::default_flags &
                                      ~(toml::format_flags::allow_multi_line_strings | toml::format_flags::allow_literal_strings);
  out << toml::toml_formatter{doc, basic_strings_only} << "\n";
  return out.str();
}

}  // namespace coil

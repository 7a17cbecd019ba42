#include "dist/checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>
#include <fmt/ranges.h>
#include <hdf5.h>

#include <cstring>
#include <filesystem>

#include "util/error.h"

namespace coil {
namespace fs = std::filesystem;

namespace {

// Closes an HDF5 handle at scope exit.
struct H5 {
  hid_t id;
  herr_t (*close)(hid_t);
  H5(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  ~H5() {
    if (id >= 0) close(id);
  }
  operator hid_t() const { return id; }
};

void check(herr_t rc, const std::string& what) {
  if (rc < 0) fail("HDF5: {} failed", what);
}

void write_tensor(hid_t group, const std::string& name, const at::Tensor& t, const std::string& file) {
  at::Tensor c = t.detach().to(at::kCPU).contiguous();
  hid_t type;
  if (c.scalar_type() == at::kFloat) type = H5T_NATIVE_FLOAT;
  else if (c.scalar_type() == at::kDouble) type = H5T_NATIVE_DOUBLE;
  else if (c.scalar_type() == at::kByte) type = H5T_NATIVE_UINT8;
  else c = c.to(at::kFloat), type = H5T_NATIVE_FLOAT;
  std::vector<hsize_t> dims(c.sizes().begin(), c.sizes().end());
  H5 space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  H5 ds(H5Dcreate2(group, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  if (ds < 0) fail("{}: cannot create dataset {}", file, name);
  check(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, c.data_ptr()), "writing " + name);
}

void read_tensor(hid_t group, const std::string& name, at::Tensor& dst, const std::string& file, const char* kind) {
  if (H5Lexists(group, name.c_str(), H5P_DEFAULT) <= 0) fail("{}: no {} tensor {}", file, kind, name);
  H5 ds(H5Dopen2(group, name.c_str(), H5P_DEFAULT), H5Dclose);
  H5 space(H5Dget_space(ds), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(space);
  std::vector<hsize_t> dims(static_cast<size_t>(std::max(rank, 0)));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  std::vector<int64_t> shape(dims.begin(), dims.end());
  if (shape != dst.sizes().vec())
    fail("{}: {} has shape [{}] in the checkpoint, the model has [{}]", file, name, fmt::join(shape, ", "),
         fmt::join(dst.sizes(), ", "));
  at::Tensor buf = at::empty(dst.sizes(), dst.options().device(at::kCPU).dtype(at::kFloat));
  hid_t type = H5T_NATIVE_FLOAT;
  if (dst.scalar_type() == at::kByte) buf = at::empty(dst.sizes(), at::kByte), type = H5T_NATIVE_UINT8;
  if (dst.scalar_type() == at::kDouble) buf = at::empty(dst.sizes(), at::kDouble), type = H5T_NATIVE_DOUBLE;
  check(H5Dread(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data_ptr()), "reading " + name);
  c10::NoGradGuard no_grad;
  dst.copy_(buf);
}

void write_string_attr(hid_t obj, const std::string& name, const std::string& value) {
  H5 type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, std::max<size_t>(1, value.size()));
  H5Tset_strpad(type, H5T_STR_NULLPAD);
  H5Tset_cset(type, H5T_CSET_UTF8);
  H5 space(H5Screate(H5S_SCALAR), H5Sclose);
  H5 attr(H5Acreate2(obj, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  check(H5Awrite(attr, type, value.data()), "writing attribute " + name);
}

void write_int_attr(hid_t obj, const std::string& name, int64_t value) {
  H5 space(H5Screate(H5S_SCALAR), H5Sclose);
  H5 attr(H5Acreate2(obj, name.c_str(), H5T_NATIVE_INT64, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  check(H5Awrite(attr, H5T_NATIVE_INT64, &value), "writing attribute " + name);
}

}  // namespace

void save_checkpoint(const std::string& dir, const CheckpointData& data) {
  const std::string tmp = dir + ".tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  const std::string file = tmp + "/checkpoint.h5";
  {
    H5 f(H5Fcreate(file.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
    if (f < 0) fail("cannot create {}", file);
    write_string_attr(f, "format", "coil.checkpoint");
    write_int_attr(f, "version", 1);
    write_int_attr(f, "step", data.step);
    for (const auto& [k, v] : data.strings) write_string_attr(f, k, v);
    for (auto [group, tensors] : {std::pair<const char*, const std::vector<NamedTensor>*>{"model", &data.model},
                                  {"optimizer", &data.optimizer}}) {
      H5 g(H5Gcreate2(f, group, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
      for (const auto& t : *tensors) write_tensor(g, t.name, t.tensor, file);
    }
    if (data.save_rng) {
      H5 g(H5Gcreate2(f, "rng", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
      write_tensor(g, "cpu", at::detail::getDefaultCPUGenerator().get_state(), file);
    }
    check(H5Fflush(f, H5F_SCOPE_GLOBAL), "flushing " + file);
  }
  // Replace an existing checkpoint of the same name only once the new one is whole.
  if (fs::exists(dir)) {
    const std::string old = dir + ".old";
    fs::remove_all(old);
    fs::rename(dir, old);
    fs::rename(tmp, dir);
    fs::remove_all(old);
  } else {
    fs::rename(tmp, dir);
  }
}

CheckpointData load_checkpoint(const std::string& dir, const std::vector<NamedTensor>& model,
                               const std::vector<NamedTensor>* optimizer, bool restore_rng) {
  const std::string file = dir + "/checkpoint.h5";
  if (!fs::exists(file)) fail("no checkpoint at {} (no checkpoint.h5)", dir);
  H5 f(H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (f < 0) fail("{}: not an HDF5 file", file);
  CheckpointData out;
  // Attributes of the root group: step (an integer) and strings.
  H5 root(H5Gopen2(f, "/", H5P_DEFAULT), H5Gclose);
  auto read_attr = [](hid_t obj, const char* name, const H5A_info_t*, void* arg) -> herr_t {
    auto* ck = static_cast<CheckpointData*>(arg);
    H5 attr(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
    H5 type(H5Aget_type(attr), H5Tclose);
    if (H5Tget_class(type) == H5T_STRING && !H5Tis_variable_str(type)) {
      std::string value(H5Tget_size(type), '\0');
      if (H5Aread(attr, type, value.data()) < 0) return -1;
      value.resize(std::strlen(value.c_str()));
      ck->strings[name] = value;
    } else if (std::string(name) == "step") {
      if (H5Aread(attr, H5T_NATIVE_INT64, &ck->step) < 0) return -1;
    }
    return 0;
  };
  check(H5Aiterate2(root, H5_INDEX_NAME, H5_ITER_INC, nullptr, read_attr, &out), "reading the attributes of " + file);
  COIL_CHECK(out.strings["format"] == "coil.checkpoint", "{}: not a Coil checkpoint", file);
  {
    H5 g(H5Gopen2(f, "model", H5P_DEFAULT), H5Gclose);
    for (auto t : model) read_tensor(g, t.name, t.tensor, file, "model");
  }
  if (optimizer) {
    H5 g(H5Gopen2(f, "optimizer", H5P_DEFAULT), H5Gclose);
    for (auto t : *optimizer) read_tensor(g, t.name, t.tensor, file, "optimizer");
  }
  if (restore_rng && H5Lexists(f, "rng", H5P_DEFAULT) > 0) {
    at::Tensor state = at::detail::getDefaultCPUGenerator().get_state();
    H5 g(H5Gopen2(f, "rng", H5P_DEFAULT), H5Gclose);
    read_tensor(g, "cpu", state, file, "rng");
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    gen.set_state(state);
  }
  return out;
}

void point_link(const std::string& parent, const std::string& link, const std::string& target) {
  const fs::path tmp = fs::path(parent) / (link + ".tmp-link");
  fs::remove(tmp);
  fs::create_directory_symlink(target, tmp);
  fs::rename(tmp, fs::path(parent) / link);  // rename(2) replaces the old link atomically
}

}  // namespace coil

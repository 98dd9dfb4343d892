// Fuzz harness for the native index: the zip central-directory reader and the restricted
// pickle VM, with no Python in the process.
//
// Built with -fsanitize=address,undefined by tests/fuzz/native_fuzz.py, either under
// libFuzzer (clang++ -fsanitize=fuzzer) or under the self-contained driver in
// csrc/fuzz/driver.cpp (g++). One input is fed to:
//   1. pyckpt::read_zip_entries over a MemorySource, then the pickle VM over each stored
//      .pkl record it finds (data.pkl, constants.pkl), as the zip index would;
//   2. the pickle VM over the whole input, then over the pickles that follow it (the legacy
//      format is a run of pickles), as the legacy index would;
//   3. the safetensors header reader (the C++ API's), and the JSON reader under it over the
//      whole input, as a shard index would be read.
// A pyckpt::CheckpointError is the expected answer to a bad input. Anything else is a
// finding: another exception (std::bad_alloc, std::out_of_range...), a sanitizer report,
// a broken invariant of the results (checked below), a crash or a hang.
//
// The sizes the two readers would read are bounded by the input, so an input of N bytes
// must never allocate more than a small multiple of N: the driver enforces a malloc limit.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "core/byte_source.h"
#include "core/error.h"
#include "index/json_value.h"
#include "index/pickle_vm.h"
#include "index/safetensors_index.h"
#include "index/zip_index.h"

namespace {

namespace pk = pyckpt::pickle;

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "FUZZ FINDING: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// The names the bindings pass from torch's weights-only allowlist, in the forms torch.save
// writes (a typical subset: the VM only compares strings), and the policy's other rules.
pk::Rules make_rules(bool torchscript, bool opaque) {
  pk::Rules rules;
  rules.blocked_modules = {"sys", "os", "posix", "nt"};
  rules.module_aliases = {{"__builtin__", "builtins"}, {"copy_reg", "copyreg"}};
  rules.opaque = opaque;
  rules.max_values = uint64_t{1} << 22;  // small, so the fuzzer reaches the limit too
  const char* const allowed[] = {
      "collections.OrderedDict",
      "collections.Counter",
      "torch._utils._rebuild_tensor",
      "torch._utils._rebuild_tensor_v2",
      "torch._utils._rebuild_tensor_v3",
      "torch._utils._rebuild_parameter",
      "torch._utils._rebuild_parameter_with_state",
      "torch._utils._rebuild_qtensor",
      "torch._utils._rebuild_sparse_tensor",
      "torch._utils._rebuild_wrapper_subclass",
      "torch._utils._rebuild_meta_tensor_no_storage",
      "torch._utils._rebuild_nested_tensor",
      "torch._tensor._rebuild_from_type_v2",
      "torch.nn.parameter.Parameter",
      "torch.Size",
      "torch.device",
      "torch.float32",
      "torch.bfloat16",
      "torch.serialization._get_layout",
      "torch.FloatStorage",
      "torch.DoubleStorage",
      "torch.HalfStorage",
      "torch.LongStorage",
      "torch.IntStorage",
      "torch.ByteStorage",
      "torch.BoolStorage",
      "torch.BFloat16Storage",
      "torch.storage.UntypedStorage",
      "torch.per_tensor_affine",
      "builtins.set",
      "builtins.complex",
      "builtins.bytearray",
      "builtins.slice",
      "_codecs.encode",
      "torch.Tensor",
      "torch.nn.modules.module.Module",
  };
  for (const char* name : allowed) rules.allowed.insert(name);
  const char* const helpers[] = {
      "torch.jit._pickle.restore_type_tag", "torch.jit._pickle.build_intlist",
      "torch.jit._pickle.build_doublelist", "torch.jit._pickle.build_boollist",
      "torch.jit._pickle.build_tensorlist",
  };
  for (const char* name : helpers) rules.torchscript_helpers.insert(name);
  rules.torchscript = torchscript;
  return rules;
}

// Four rule sets: plain or TorchScript names, each in the default and in opaque mode.
const pk::Rules& rules_for(bool torchscript, bool opaque) {
  static const pk::Rules sets[4] = {make_rules(false, false), make_rules(true, false),
                                    make_rules(false, true), make_rules(true, true)};
  return sets[(torchscript ? 1 : 0) + (opaque ? 2 : 0)];
}

// What bindings/py_tree.cpp relies on when it walks the tree.
void check_tree(const pk::Tree& tree, size_t size, size_t start) {
  const size_t count = tree.nodes.size();
  if (count == 0) finding("tree has no nodes");
  if (tree.root >= count) finding("root node out of range");
  if (tree.end <= start || tree.end > size) finding("end offset outside the pickle");
  if (tree.nodes[0].kind != pk::Kind::kNone) finding("node 0 is not None");
  for (const auto& [id, extras] : tree.extras) {
    if (id >= count) finding("extras of a node out of range");
    const pk::Node& node = tree.nodes[id];
    for (const pk::Build& build : extras.builds) {
      if (build.state >= count) finding("build state node out of range");
      if (build.offset >= size) finding("build offset outside the pickle");
    }
    for (pk::NodeId item : extras.appended) {
      if (item >= count) finding("appended node out of range");
    }
    for (pk::NodeId item : extras.set_items) {
      if (item >= count) finding("set item node out of range");
    }
    if (extras.set_items.size() % 2) finding("opaque object with an odd number of set items");
    if (!extras.builds.empty() && node.kind != pk::Kind::kCall && node.kind != pk::Kind::kDict) {
      finding("BUILD accepted on a plain value");
    }
    if ((!extras.appended.empty() || !extras.set_items.empty()) && node.kind != pk::Kind::kCall) {
      finding("APPEND or SETITEM accepted on something that is not an opaque object");
    }
  }
  for (size_t id = 0; id < count; ++id) {
    const pk::Node& node = tree.nodes[id];
    const std::vector<pk::NodeId>& items = tree.items(node);
    for (pk::NodeId item : items) {
      if (item >= count) finding("item node out of range");
    }
    if (node.offset >= size && id != 0) finding("node offset outside the pickle");
    switch (node.kind) {
      case pk::Kind::kCall: {
        const bool shape = items.size() == 2 || items.size() == 3;
        const pk::Kind func = shape ? tree.nodes[items[0]].kind : pk::Kind::kNone;
        if (!shape || (func != pk::Kind::kGlobal && func != pk::Kind::kCall && func != pk::Kind::kPersistent)) {
          finding("call node is not [callable, args(, kwargs)]");
        }
        break;
      }
      case pk::Kind::kPersistent:
        if (items.size() != 1) finding("persistent node without exactly one id");
        break;
      case pk::Kind::kDict:
        if (items.size() % 2) finding("dict node with an odd number of items");
        break;
      case pk::Kind::kGlobal:
        if (tree.text(node).find('\n') == std::string::npos) finding("global node without module and name");
        break;
      default:
        break;
    }
  }
}

// One pickle, or a run of up to `max_pickles` (the legacy format). Returns how many ran.
int run_pickles(const uint8_t* data, size_t size, bool torchscript, bool opaque, int max_pickles) {
  size_t start = 0;
  int done = 0;
  while (done < max_pickles && start < size) {
    try {
      const pk::Tree tree = pk::unpickle(data, size, start, rules_for(torchscript, opaque));
      check_tree(tree, size, start);
      start = tree.end;
      ++done;
    } catch (const pyckpt::CheckpointError&) {
      break;
    }
  }
  return done;
}

bool ends_with(const std::string& text, const char* suffix) {
  const std::string tail(suffix);
  return text.size() >= tail.size() && text.compare(text.size() - tail.size(), tail.size(), tail) == 0;
}

void run_zip(const uint8_t* data, size_t size, bool opaque) {
  std::vector<pyckpt::ZipEntry> entries;
  try {
    entries = pyckpt::read_zip_entries(pyckpt::MemorySource(data, size));
  } catch (const pyckpt::CheckpointError&) {
    return;
  }
  bool torchscript = false;
  for (const pyckpt::ZipEntry& entry : entries) {
    // What the Python side relies on: every record lies inside the file, after its header.
    if (entry.data_offset > size || entry.compressed_size > size - entry.data_offset) {
      finding("zip entry data outside the file: " + entry.name);
    }
    if (entry.header_offset + 30 > entry.data_offset) finding("zip entry data before its header");
    if (entry.method != pyckpt::kMethodStored && entry.method != pyckpt::kMethodDeflate) {
      finding("zip entry with an unchecked method");
    }
    if (entry.method == pyckpt::kMethodStored && entry.size != entry.compressed_size) {
      finding("stored zip entry whose sizes differ");
    }
    if (entry.name.empty() || entry.name[0] == '/' || entry.name.find("..") != std::string::npos) {
      if (entry.name.empty() || entry.name[0] == '/') finding("unsafe record name accepted");
      // ".." inside a longer part ("a..b") is a legal name; a whole ".." part is not.
      size_t at = 0;
      while ((at = entry.name.find("..", at)) != std::string::npos) {
        const bool starts = at == 0 || entry.name[at - 1] == '/';
        const bool ends = at + 2 == entry.name.size() || entry.name[at + 2] == '/';
        if (starts && ends) finding("record name with a '..' part accepted");
        at += 2;
      }
    }
    if (ends_with(entry.name, "/constants.pkl")) torchscript = true;
  }
  for (const pyckpt::ZipEntry& entry : entries) {
    if (!ends_with(entry.name, ".pkl") || entry.method != pyckpt::kMethodStored) continue;
    run_pickles(data + entry.data_offset, static_cast<size_t>(entry.size), torchscript, opaque, 1);
  }
}

// What the C++ API relies on: the tensors tile the data after the header, each of its size.
void run_safetensors(const uint8_t* data, size_t size) {
  const pyckpt::MemorySource source(data, size);
  if (pyckpt::looks_safetensors(source)) {
    try {
      const pyckpt::SafetensorsIndex index = pyckpt::read_safetensors_index(source);
      uint64_t next = index.tensors.empty() ? size : index.tensors.front().data_offset;
      for (const pyckpt::SafetensorsTensor& tensor : index.tensors) {
        if (tensor.data_offset != next) finding("safetensors tensors do not tile the data: " + tensor.name);
        if (tensor.data_offset > size || tensor.nbytes > size - tensor.data_offset) {
          finding("safetensors tensor outside the file: " + tensor.name);
        }
        uint64_t numel = 1;
        for (int64_t n : tensor.shape) numel *= static_cast<uint64_t>(n);
        if (numel * tensor.itemsize != tensor.nbytes) finding("safetensors shape disagrees with its bytes");
        next = tensor.data_offset + tensor.nbytes;
      }
      if (next != size) finding("safetensors data not covered to the end of the file");
    } catch (const pyckpt::CheckpointError&) {
    }
  }
  try {
    pyckpt::parse_json(std::string(reinterpret_cast<const char*>(data), size), "index");
  } catch (const pyckpt::CheckpointError&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    // The last byte picks the rules: bit 0 the TorchScript names, bit 1 opaque mode, so
    // every set of global rules is exercised.
    const uint8_t last = size > 0 ? data[size - 1] : 0;
    run_zip(data, size, (last & 2) != 0);
    // The legacy format: magic, protocol, sys_info, object, keys.
    run_pickles(data, size, (last & 1) != 0, (last & 2) != 0, 5);
    run_safetensors(data, size);
  } catch (const pyckpt::CheckpointError&) {
    finding("CheckpointError escaped the harness's own handlers");
  } catch (const std::exception& error) {
    finding(std::string("exception other than CheckpointError: ") + error.what());
  } catch (...) {
    finding("unknown exception");
  }
  return 0;
}

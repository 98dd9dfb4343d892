// Fuzz harness for the native index: the zip central-directory reader and the restricted
// pickle VM, with no Python in the process.
//
// Built with -fsanitize=address,undefined by tests/fuzz/native_fuzz.py, either under
// libFuzzer (clang++ -fsanitize=fuzzer) or under the self-contained driver in
// csrc/fuzz/driver.cpp (g++). One input is fed to:
//   1. pyckpt::read_zip_entries over a MemorySource, then the pickle VM over each stored
//      .pkl record it finds (data.pkl, constants.pkl), as the zip index would;
//   2. the pickle VM over the whole input, then over the pickles that follow it (the legacy
//      format is a run of pickles), as the legacy index would.
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
#include "index/pickle_vm.h"
#include "index/zip_index.h"

namespace {

namespace pk = pyckpt::pickle;

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "FUZZ FINDING: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// The names bindings.cpp passes from torch's weights-only allowlist, in the forms
// torch.save writes (a typical subset: the VM only compares strings).
pk::Rules make_rules(bool torchscript) {
  pk::Rules rules;
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

const pk::Rules& rules_for(bool torchscript) {
  static const pk::Rules plain = make_rules(false);
  static const pk::Rules script = make_rules(true);
  return torchscript ? script : plain;
}

// What bindings.cpp relies on when it walks the tree.
void check_tree(const pk::Tree& tree, size_t size, size_t start) {
  const size_t count = tree.nodes.size();
  if (count == 0) finding("tree has no nodes");
  if (tree.root >= count) finding("root node out of range");
  if (tree.end <= start || tree.end > size) finding("end offset outside the pickle");
  if (tree.nodes[0].kind != pk::Kind::kNone) finding("node 0 is not None");
  for (size_t id = 0; id < count; ++id) {
    const pk::Node& node = tree.nodes[id];
    for (pk::NodeId item : node.items) {
      if (item >= count) finding("item node out of range");
    }
    for (const pk::Build& build : node.builds) {
      if (build.state >= count) finding("build state node out of range");
      if (build.offset >= size) finding("build offset outside the pickle");
    }
    if (node.offset >= size && id != 0) finding("node offset outside the pickle");
    switch (node.kind) {
      case pk::Kind::kCall:
        if (node.items.size() != 2 || tree.nodes[node.items[0]].kind != pk::Kind::kGlobal) {
          finding("call node is not [global, args]");
        }
        break;
      case pk::Kind::kPersistent:
        if (node.items.size() != 1) finding("persistent node without exactly one id");
        break;
      case pk::Kind::kDict:
        if (node.items.size() % 2) finding("dict node with an odd number of items");
        break;
      case pk::Kind::kGlobal:
        if (node.text.empty()) finding("global node without a name");
        break;
      default:
        break;
    }
    if (!node.builds.empty() && node.kind != pk::Kind::kCall && node.kind != pk::Kind::kDict) {
      finding("BUILD accepted on a plain value");
    }
  }
}

// One pickle, or a run of up to `max_pickles` (the legacy format). Returns how many ran.
int run_pickles(const uint8_t* data, size_t size, bool torchscript, int max_pickles) {
  size_t start = 0;
  int done = 0;
  while (done < max_pickles && start < size) {
    try {
      const pk::Tree tree = pk::unpickle(data, size, start, rules_for(torchscript));
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

void run_zip(const uint8_t* data, size_t size) {
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
    run_pickles(data + entry.data_offset, static_cast<size_t>(entry.size), torchscript, 1);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    run_zip(data, size);
    // The legacy format: magic, protocol, sys_info, object, keys. The last byte picks the
    // TorchScript rules, so both sets of global rules are exercised.
    run_pickles(data, size, size > 0 && (data[size - 1] & 1), 5);
  } catch (const pyckpt::CheckpointError&) {
    finding("CheckpointError escaped the harness's own handlers");
  } catch (const std::exception& error) {
    finding(std::string("exception other than CheckpointError: ") + error.what());
  } catch (...) {
    finding("unknown exception");
  }
  return 0;
}

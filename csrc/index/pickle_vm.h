// The restricted unpickler: the native twin of pyckpt/index/py_unpickler.py.
//
// It accepts exactly the opcodes of torch's weights-only unpickler (protocol 2 plus
// EMPTY_SET) and the globals on the allowlist it is given. It never interprets a call: it
// builds a tree (an arena of nodes) in which REDUCE/NEWOBJ, BUILD and persistent ids stay
// symbolic, and bindings.cpp hands them to the same Python Interpreter the fallback uses.
// Nothing here recurses, so nesting depth cannot overflow the stack.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_set>
#include <vector>

namespace pyckpt::pickle {

enum class Kind : uint8_t {
  kNone,
  kBool,        // flag
  kInt,         // integer (fits int64)
  kBigInt,      // text: little-endian two's complement bytes (LONG1 wider than 8 bytes)
  kFloat,       // real
  kString,      // text: UTF-8 (surrogates allowed, as Python's "surrogatepass")
  kList,        // items
  kTuple,       // items
  kDict,        // items: key0, value0, key1, value1, ...; dict_type says which mapping
  kSet,         // empty set (EMPTY_SET); items
  kGlobal,      // text: full dotted name, already checked against the allowlist
  kCall,        // items: [callable (a kGlobal), args]; flag: NEWOBJ rather than REDUCE
  kPersistent,  // items: [persistent id]
};

enum class DictType : uint8_t { kDict, kOrderedDict, kCounter };

using NodeId = uint32_t;

struct Build {
  NodeId state;
  uint64_t offset;  // of the BUILD opcode, for error messages
};

struct Node {
  Kind kind = Kind::kNone;
  DictType dict_type = DictType::kDict;
  bool flag = false;
  int64_t integer = 0;
  double real = 0.0;
  uint64_t offset = 0;  // of the opcode that made the node
  std::string text;
  std::vector<NodeId> items;
  std::vector<Build> builds;  // BUILD states applied to this node, in order
};

struct Tree {
  std::vector<Node> nodes;
  NodeId root = 0;
  uint64_t end = 0;  // offset just past STOP
};

// What the file may name. `allowed` are full dotted names; in a TorchScript archive,
// names starting with "__torch__." and the `torchscript_helpers` are also accepted.
struct Rules {
  std::unordered_set<std::string> allowed;
  std::unordered_set<std::string> torchscript_helpers;
  bool torchscript = false;
};

Tree unpickle(const uint8_t* data, size_t size, size_t start, const Rules& rules);

// The full name a GLOBAL resolves to, or CheckpointError (kUnsafe) if it may not be named.
std::string check_global(const std::string& module, const std::string& name, const Rules& rules);

}  // namespace pyckpt::pickle

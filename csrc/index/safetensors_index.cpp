#include "index/safetensors_index.h"

#include <algorithm>
#include <unordered_map>

#include "core/error.h"
#include "index/json_value.h"

namespace pyckpt {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the safetensors library's own limit
const char* const kMetadataKey = "__metadata__";

uint64_t itemsize_of(const std::string& code) {
  static const std::unordered_map<std::string, uint64_t> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2}, {"I8", 1}, {"U8", 1},
      {"BOOL", 1}, {"C64", 8}, {"U64", 8}, {"U32", 4}, {"U16", 2}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
      {"F8_E4M3FNUZ", 1}, {"F8_E5M2FNUZ", 1}};
  const auto found = sizes.find(code);
  return found == sizes.end() ? 0 : found->second;
}

uint64_t little_endian(const std::vector<uint8_t>& bytes) {
  uint64_t value = 0;
  for (size_t i = 8; i-- > 0;) value = (value << 8) | bytes[i];
  return value;
}

// A shape's byte count can pass 2**64 in a lying header; Python prints it exactly.
std::string decimal(unsigned __int128 value) {
  std::string digits;
  do {
    digits.insert(digits.begin(), static_cast<char>('0' + static_cast<int>(value % 10)));
    value /= 10;
  } while (value != 0);
  return digits;
}

const char* python_type(const JsonValue& value) {
  switch (value.type) {
    case JsonValue::Type::kNull: return "NoneType";
    case JsonValue::Type::kBool: return "bool";
    case JsonValue::Type::kNumber: return value.is_integer ? "int" : "float";
    case JsonValue::Type::kString: return "str";
    case JsonValue::Type::kArray: return "list";
    case JsonValue::Type::kObject: return "dict";
  }
  return "value";
}

SafetensorsTensor entry(const std::string& name, const JsonValue& fields) {
  const JsonValue* code = fields.member("dtype");
  const JsonValue* shape = fields.member("shape");
  const JsonValue* offsets = fields.member("data_offsets");
  if (!fields.is_object() || fields.members.size() != 3 || !code || !shape || !offsets) {
    fail("header entry must hold exactly dtype, shape and data_offsets", name);
  }
  SafetensorsTensor tensor{name, code->is_string() ? code->text : "", 0, {}, 0, 0};
  tensor.itemsize = itemsize_of(tensor.dtype);
  if (tensor.itemsize == 0) fail("unknown safetensors dtype " + code->repr(), name);
  bool shape_ok = shape->is_array();
  for (const JsonValue& n : shape->items) shape_ok = shape_ok && n.is_int64() && n.integer >= 0;
  if (!shape_ok) fail("shape " + shape->repr() + " is not a list of non-negative integers", name);
  const bool offsets_ok = offsets->is_array() && offsets->items.size() == 2 && offsets->items[0].is_int64() &&
                          offsets->items[1].is_int64() && 0 <= offsets->items[0].integer &&
                          offsets->items[0].integer <= offsets->items[1].integer;
  if (!offsets_ok) fail("data_offsets " + offsets->repr() + " are not [begin, end] with 0 <= begin <= end", name);
  unsigned __int128 nbytes = tensor.itemsize;
  bool overflow = false;
  for (const JsonValue& n : shape->items) {
    tensor.shape.push_back(n.integer);
    const auto dim = static_cast<unsigned __int128>(n.integer);
    if (dim != 0 && nbytes > ~static_cast<unsigned __int128>(0) / dim) overflow = true;
    nbytes *= dim;
  }
  const auto begin = static_cast<uint64_t>(offsets->items[0].integer);
  const auto end = static_cast<uint64_t>(offsets->items[1].integer);
  if (overflow || nbytes != end - begin) {
    fail("shape " + shape->repr() + " of " + tensor.dtype + " needs " +
             (overflow ? "more than 2**128" : decimal(nbytes)) + " bytes but data_offsets [" + std::to_string(begin) +
             ", " + std::to_string(end) + "] give " + std::to_string(end - begin),
         name);
  }
  tensor.data_offset = begin;  // relative until the caller places it
  tensor.nbytes = end - begin;
  return tensor;
}

}  // namespace

bool looks_safetensors(const ByteSource& source) {
  if (source.size() < 9) return false;
  const std::vector<uint8_t> head = source.read(0, 9);
  return head[8] == '{' && little_endian(head) > 0;
}

SafetensorsIndex read_safetensors_index(const ByteSource& source) {
  const uint64_t header_length = little_endian(source.read(0, 8));
  if (header_length > kMaxHeaderBytes) {
    fail("safetensors header declares " + std::to_string(header_length) + " bytes, over the " +
         std::to_string(kMaxHeaderBytes) + " byte limit");
  }
  if (8 + header_length > source.size()) {
    fail("safetensors header declares " + std::to_string(header_length) + " bytes but the file holds " +
         std::to_string(source.size() - 8) + " after its length");
  }
  const std::vector<uint8_t> raw = source.read(8, header_length);
  const JsonValue header = parse_json(std::string(raw.begin(), raw.end()), "safetensors header");
  if (!header.is_object()) {
    fail(std::string("safetensors header is a JSON ") + python_type(header) + ", not an object");
  }
  SafetensorsIndex index;
  if (const JsonValue* metadata = header.member(kMetadataKey)) {  // checked first, as in Python
    bool strings = metadata->is_object() || metadata->type == JsonValue::Type::kNull;
    for (const auto& [key, value] : metadata->members) strings = strings && value.is_string();
    if (!strings) fail("safetensors __metadata__ must map names to strings");
    for (const auto& [key, value] : metadata->members) index.metadata.emplace_back(key, value.text);
  }
  for (const auto& [name, fields] : header.members) {
    if (name != kMetadataKey) index.tensors.push_back(entry(name, fields));
  }
  std::stable_sort(index.tensors.begin(), index.tensors.end(),
                   [](const SafetensorsTensor& a, const SafetensorsTensor& b) { return a.data_offset < b.data_offset; });
  const uint64_t data_start = 8 + header_length;
  const uint64_t data_bytes = source.size() - data_start;
  uint64_t covered = 0;
  for (SafetensorsTensor& tensor : index.tensors) {
    const uint64_t begin = tensor.data_offset;
    const uint64_t end = begin + tensor.nbytes;
    const std::string offsets = "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "] ";
    if (begin != covered) {
      const std::string what = begin < covered ? "overlaps the tensor before it"
                                               : "leaves " + std::to_string(begin - covered) + " bytes unused before it";
      fail(offsets + what + " (which ends at " + std::to_string(covered) + ")", tensor.name);
    }
    if (end > data_bytes) {
      fail(offsets + "run past the end of the data (" + std::to_string(data_bytes) + " bytes)", tensor.name);
    }
    covered = end;
    tensor.data_offset = data_start + begin;
  }
  if (covered != data_bytes) {
    fail("the tensors' data ends at " + std::to_string(covered) + " but the file holds " + std::to_string(data_bytes) +
         " bytes of data");
  }
  return index;
}

}  // namespace pyckpt

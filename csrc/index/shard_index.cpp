#include "index/shard_index.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "index/json_value.h"

namespace pyckpt {
namespace {

// In the order transformers prefers them.
const char* const kIndexNames[] = {"model.safetensors.index.json", "pytorch_model.bin.index.json"};
const char* const kSingleNames[] = {"model.safetensors", "pytorch_model.bin"};
constexpr uint64_t kMaxIndexBytes = 100'000'000;

bool is_file(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}

bool is_directory(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

bool ends_with(const std::string& text, const std::string& tail) {
  return text.size() >= tail.size() && text.compare(text.size() - tail.size(), tail.size(), tail) == 0;
}

std::string directory_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

std::string join(const std::string& directory, const std::string& name) {
  return directory.empty() || directory.back() == '/' ? directory + name : directory + "/" + name;
}

// A shard must be a plain file name: nothing that could reach outside the index's directory.
void check_shard_name(const std::string& name) {
  const bool plain = !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
                     name.find('\\') == std::string::npos;
  if (!plain) fail("shard '" + name + "' is not a file name beside the index (it would escape the directory)");
}

ShardIndex read_index(const std::string& index_path) {
  struct stat info {};
  if (::stat(index_path.c_str(), &info) != 0) fail("cannot open the index: " + std::string(std::strerror(errno)));
  if (static_cast<uint64_t>(info.st_size) > kMaxIndexBytes) {
    fail("index of " + std::to_string(info.st_size) + " bytes is over the " + std::to_string(kMaxIndexBytes) +
         " byte limit");
  }
  std::ifstream in(index_path, std::ios::binary);
  if (!in) fail("cannot open the index");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const JsonValue document = parse_json(text, "index");
  const JsonValue* weight_map = document.is_object() ? document.member("weight_map") : nullptr;
  bool names = weight_map && weight_map->is_object();
  if (names) {
    for (const auto& [key, value] : weight_map->members) names = names && value.is_string();
  }
  if (!names) fail("index has no weight_map of key -> shard file names");
  if (weight_map->members.empty()) fail("index has an empty weight_map");
  ShardIndex index;
  index.index_path = index_path;
  const std::string directory = directory_of(index_path);
  std::unordered_map<std::string, size_t> shard_of_name;
  for (const auto& [key, name] : weight_map->members) {
    auto found = shard_of_name.find(name.text);
    if (found == shard_of_name.end()) {
      check_shard_name(name.text);
      const std::string shard = join(directory, name.text);
      if (!is_file(shard)) fail("shard '" + name.text + "' named by the index is missing");
      found = shard_of_name.emplace(name.text, index.shards.size()).first;
      index.shards.push_back(shard);
      index.names.push_back(name.text);
    }
    index.weight_map.emplace_back(key, found->second);
  }
  return index;
}

}  // namespace

void ShardIndex::check_shard(size_t shard, const std::vector<std::string>& keys) const {
  std::unordered_map<std::string, size_t> placed;
  std::unordered_set<std::string> listed;
  for (const auto& [key, holder] : weight_map) {
    placed.emplace(key, holder);
    if (holder == shard) listed.insert(key);
  }
  std::vector<std::string> unlisted;
  for (const std::string& key : keys) {
    if (!listed.count(key)) unlisted.push_back(key);
  }
  if (!unlisted.empty()) {
    const auto elsewhere = placed.find(unlisted[0]);
    fail("shard holds " + std::to_string(unlisted.size()) + " keys the index does not list there, e.g. '" +
         unlisted[0] + "'" +
         (elsewhere == placed.end() ? "" : " (the index puts it in '" + names[elsewhere->second] + "')"));
  }
  const std::unordered_set<std::string> held(keys.begin(), keys.end());
  std::vector<std::string> absent;
  for (const auto& [key, holder] : weight_map) {
    if (holder == shard && !held.count(key)) absent.push_back(key);
  }
  if (!absent.empty()) {
    fail("the index lists " + std::to_string(absent.size()) + " keys in this shard that it does not hold, e.g. '" +
         absent[0] + "'");
  }
}

CheckpointLocation locate_checkpoint(const std::string& path) {
  CheckpointLocation location;
  if (is_directory(path)) {
    if (is_file(join(path, ".metadata"))) {
      fail("a torch.distributed.checkpoint (DCP) directory: the C++ API does not read DCP; "
           "convert it first (python -m pyckpt convert DIR out.safetensors)");
    }
    for (const char* name : kIndexNames) {
      if (is_file(join(path, name))) {
        location.sharded = read_index(join(path, name));
        return location;
      }
    }
    for (const char* name : kSingleNames) {
      if (is_file(join(path, name))) {
        location.file = join(path, name);
        return location;
      }
    }
    fail("directory holds no checkpoint: none of model.safetensors.index.json, pytorch_model.bin.index.json, "
         "model.safetensors, pytorch_model.bin, nor a DCP .metadata");
  }
  if (ends_with(path, ".index.json")) {
    location.sharded = read_index(path);
    return location;
  }
  location.file = path;
  return location;
}

}  // namespace pyckpt

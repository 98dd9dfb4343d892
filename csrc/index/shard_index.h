// What a checkpoint path names when it is not one file: a Hugging Face model directory, or
// its index file (model.safetensors.index.json / pytorch_model.bin.index.json, mapping every
// key to the shard that holds it). The native twin of pyckpt/index/sharded.py, with its rules
// and messages: shards are plain file names beside the index, each must exist, and each must
// hold exactly the keys the index gives it.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace pyckpt {

struct ShardIndex {
  std::string index_path;
  std::vector<std::string> shards;  // paths, in first-use order
  std::vector<std::string> names;   // the same shards as the index names them (plain file names)
  std::vector<std::pair<std::string, size_t>> weight_map;  // key -> shard, in the index's order

  // CheckpointError unless `keys` are exactly the keys the index puts in shard `shard` (the
  // caller names the shard).
  void check_shard(size_t shard, const std::vector<std::string>& keys) const;
};

struct CheckpointLocation {
  std::string file;     // one checkpoint file (a plain path, or a model directory's single file)...
  ShardIndex sharded;   // ...or, when `file` is empty, an index and its shards
};

// A directory or an ".index.json" path resolved; any other path is returned as the file.
// A DCP directory is refused: only the Python package reads it.
CheckpointLocation locate_checkpoint(const std::string& path);

}  // namespace pyckpt

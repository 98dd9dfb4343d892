#include "io/parallel_read.h"

#include <algorithm>

#include "core/parallel.h"

namespace pyckpt {
namespace {

struct Piece {
  size_t source;
  ReadJob read;
};

}  // namespace

void parallel_read(const ByteSource& source, const std::vector<ReadJob>& jobs, int threads, uint64_t chunk_bytes) {
  parallel_read(std::vector<SourceReads>{{&source, jobs}}, threads, chunk_bytes);
}

void parallel_read(const std::vector<SourceReads>& sources, int threads, uint64_t chunk_bytes) {
  std::vector<Piece> pieces;
  for (size_t s = 0; s < sources.size(); ++s) {
    const size_t first = pieces.size();
    for (const ReadJob& job : sources[s].jobs) {
      try {
        sources[s].source->check_range(job.offset, job.length, "read");
      } catch (const CheckpointError& error) {
        throw SourceReadError(error, s);
      }
      for (uint64_t done = 0; done < job.length; done += chunk_bytes) {
        const uint64_t length = std::min(chunk_bytes, job.length - done);
        pieces.push_back({s, {job.offset + done, length, job.dest + done}});
      }
    }
    // Front to back through each file, whatever order the caller's keys gave the jobs.
    std::stable_sort(pieces.begin() + first, pieces.end(),
                     [](const Piece& a, const Piece& b) { return a.read.offset < b.read.offset; });
  }
  parallel_for<NoScratch>(pieces.size(), threads, [&](size_t i, NoScratch&) {
    const Piece& piece = pieces[i];
    try {
      sources[piece.source].source->read_into(piece.read.offset, piece.read.length, piece.read.dest);
    } catch (const CheckpointError& error) {
      throw SourceReadError(error, piece.source);
    }
  });
}

}  // namespace pyckpt

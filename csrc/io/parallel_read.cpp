#include "io/parallel_read.h"

#include <algorithm>

#include "core/parallel.h"

namespace pyckpt {

void parallel_read(const ByteSource& source, const std::vector<ReadJob>& jobs, int threads,
                   uint64_t chunk_bytes) {
  std::vector<ReadJob> pieces;
  for (const ReadJob& job : jobs) {
    source.check_range(job.offset, job.length, "read");
    for (uint64_t done = 0; done < job.length; done += chunk_bytes) {
      const uint64_t length = std::min(chunk_bytes, job.length - done);
      pieces.push_back({job.offset + done, length, job.dest + done});
    }
  }
  parallel_for<NoScratch>(pieces.size(), threads, [&](size_t i, NoScratch&) {
    source.read_into(pieces[i].offset, pieces[i].length, pieces[i].dest);
  });
}

}  // namespace pyckpt

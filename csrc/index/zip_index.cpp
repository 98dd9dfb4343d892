#include "index/zip_index.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <string_view>
#include <unordered_set>

#include "core/error.h"
#include "core/parallel.h"

namespace pyckpt {
namespace {

constexpr uint64_t kEocdSize = 22;
constexpr uint64_t kZip64LocatorSize = 20;
constexpr uint64_t kZip64EocdSize = 56;
constexpr uint64_t kCentralSize = 46;
constexpr uint64_t kLocalSize = 30;
constexpr uint64_t kMaxComment = 0xFFFF;
constexpr uint32_t kU32Max = 0xFFFFFFFFu;
constexpr uint16_t kU16Max = 0xFFFF;

uint16_t u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t u32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
uint64_t u64(const uint8_t* p) { return u32(p) | (static_cast<uint64_t>(u32(p + 4)) << 32); }

bool has_signature(const uint8_t* p, uint8_t third, uint8_t fourth) {
  return p[0] == 'P' && p[1] == 'K' && p[2] == third && p[3] == fourth;
}

std::string str(uint64_t value) { return std::to_string(value); }

int64_t find_eocd(const std::vector<uint8_t>& tail) {
  if (tail.size() < kEocdSize) return -1;
  for (int64_t at = static_cast<int64_t>(tail.size() - kEocdSize); at >= 0; --at) {
    const uint8_t* p = tail.data() + at;
    if (!has_signature(p, 5, 6)) continue;
    const uint64_t comment_length = u16(p + 20);
    if (static_cast<uint64_t>(at) + kEocdSize + comment_length == tail.size()) return at;
  }
  return -1;
}

void check_name(const std::string& name) {
  bool bad = name.empty() || name[0] == '/' || name.find('\\') != std::string::npos ||
             name.find('\0') != std::string::npos;
  size_t start = 0;
  while (!bad && start <= name.size()) {
    size_t slash = name.find('/', start);
    if (slash == std::string::npos) slash = name.size();
    const std::string part = name.substr(start, slash - start);
    if (part == "." || part == "..") bad = true;
    start = slash + 1;
  }
  if (bad) fail("record name is empty, absolute or climbs out of the archive", name);
}

struct Zip64Values {
  uint64_t size, compressed, header_offset;
};

Zip64Values zip64_extra(const uint8_t* extra, uint64_t length, const std::string& name,
                        Zip64Values values) {
  uint64_t pos = 0;
  while (pos + 4 <= length) {
    const uint16_t block_id = u16(extra + pos);
    const uint64_t block_size = u16(extra + pos + 2);
    if (pos + 4 + block_size > length) break;
    const uint8_t* body = extra + pos + 4;
    if (block_id == 0x0001) {
      const bool need_size = values.size == kU32Max;
      const bool need_compressed = values.compressed == kU32Max;
      const bool need_offset = values.header_offset == kU32Max;
      const uint64_t needed = 8u * (need_size + need_compressed + need_offset);
      if (needed > block_size) break;
      uint64_t at = 0;
      if (need_size) values.size = u64(body + at), at += 8;
      if (need_compressed) values.compressed = u64(body + at), at += 8;
      if (need_offset) values.header_offset = u64(body + at), at += 8;
      return values;
    }
    pos += 4 + block_size;
  }
  fail("zip64 sizes are missing from the record's extra field", name);
}

ZipEntry parse_central(const std::vector<uint8_t>& directory, uint64_t& pos, uint64_t cd_offset) {
  if (pos + kCentralSize > directory.size()) fail("central directory is truncated");
  const uint8_t* p = directory.data() + pos;
  if (!has_signature(p, 1, 2)) {
    fail("bad central directory entry signature at offset " + str(cd_offset + pos));
  }
  ZipEntry entry;
  entry.flags = u16(p + 8);
  entry.method = u16(p + 10);
  entry.crc32 = u32(p + 16);
  uint64_t compressed = u32(p + 20);
  uint64_t size = u32(p + 24);
  const uint64_t name_length = u16(p + 28);
  const uint64_t extra_length = u16(p + 30);
  const uint64_t comment_length = u16(p + 32);
  const uint16_t disk_start = u16(p + 34);
  uint64_t header_offset = u32(p + 42);
  const uint64_t end = pos + kCentralSize + name_length + extra_length + comment_length;
  if (end > directory.size()) fail("central directory is truncated");
  entry.name.assign(reinterpret_cast<const char*>(p + kCentralSize), name_length);
  const std::string& name = entry.name;
  if (size == kU32Max || compressed == kU32Max || header_offset == kU32Max ||
      disk_start == kU16Max) {
    const Zip64Values values = zip64_extra(p + kCentralSize + name_length, extra_length, name,
                                           {size, compressed, header_offset});
    size = values.size;
    compressed = values.compressed;
    header_offset = values.header_offset;
  }
  check_name(name);
  if (entry.flags & 0x1) fail("record is encrypted", name);
  if (entry.method != kMethodStored && entry.method != kMethodDeflate) {
    fail("record uses compression method " + str(entry.method) +
             "; only stored (0) and deflate (8) are supported",
         name);
  }
  if (entry.method == kMethodStored && compressed != size) {
    fail("stored record declares " + str(size) + " bytes but occupies " + str(compressed), name);
  }
  // Deflate cannot expand beyond ~1032:1; a larger claim is a lie (or a bomb).
  if (entry.method == kMethodDeflate && compressed <= (UINT64_MAX - 1024) / 1032 &&
      size > compressed * 1032 + 1024) {
    fail("deflate record claims to inflate " + str(compressed) + " bytes to " + str(size) +
             ", beyond deflate's limit",
         name);
  }
  if (header_offset > cd_offset || cd_offset - header_offset < kLocalSize) {
    fail("local header offset " + str(header_offset) + " is not before the central directory",
         name);
  }
  entry.compressed_size = compressed;
  entry.size = size;
  entry.header_offset = header_offset;
  pos = end;
  return entry;
}

// The record's local header: where its data starts, and that it names the same record. One
// read covers the fixed header and the name in the usual case.
void resolve_local(ZipEntry& entry, const ByteSource& source, uint64_t cd_offset) {
  const std::string& name = entry.name;
  const uint64_t header_offset = entry.header_offset;
  const uint64_t compressed = entry.compressed_size;
  const bool together = cd_offset - header_offset >= kLocalSize + name.size();
  // A buffer on the stack for the usual short name: an archive of 50,000 records would
  // otherwise spend more time in malloc than in pread.
  uint8_t inline_buffer[kLocalSize + 224];
  const uint64_t wanted = together ? kLocalSize + name.size() : kLocalSize;
  std::vector<uint8_t> long_buffer;
  uint8_t* local = inline_buffer;
  if (wanted > sizeof(inline_buffer)) {
    long_buffer.resize(wanted);
    local = long_buffer.data();
  }
  source.read_into(header_offset, wanted, local);
  if (!has_signature(local, 3, 4)) {
    fail("no local header at offset " + str(header_offset), name);
  }
  const uint64_t local_name_length = u16(local + 26);
  const uint64_t local_extra_length = u16(local + 28);
  const uint64_t data_offset = header_offset + kLocalSize + local_name_length + local_extra_length;
  if (data_offset > cd_offset || compressed > cd_offset - data_offset) {
    fail("data (" + str(compressed) + " bytes at offset " + str(data_offset) +
             ") runs into the central directory at offset " + str(cd_offset),
         name);
  }
  bool same_name;
  if (together && local_name_length == name.size()) {
    same_name = std::memcmp(local + kLocalSize, name.data(), name.size()) == 0;
  } else {
    const std::vector<uint8_t> local_name = source.read(header_offset + kLocalSize, local_name_length);
    same_name = local_name.size() == name.size() &&
                std::memcmp(local_name.data(), name.data(), name.size()) == 0;
  }
  if (!same_name) fail("local header names a different record", name);
  entry.data_offset = data_offset;
}

void check_no_overlap(const std::vector<ZipEntry>& entries) {
  std::vector<const ZipEntry*> ordered;
  ordered.reserve(entries.size());
  for (const ZipEntry& entry : entries) ordered.push_back(&entry);
  std::stable_sort(ordered.begin(), ordered.end(), [](const ZipEntry* a, const ZipEntry* b) {
    return a->header_offset < b->header_offset;
  });
  for (size_t i = 0; i + 1 < ordered.size(); ++i) {
    const ZipEntry& current = *ordered[i];
    const ZipEntry& following = *ordered[i + 1];
    const uint64_t data_end = current.data_offset + current.compressed_size;
    if (data_end > following.header_offset) {
      fail("record overlaps record '" + following.name + "' (data ends at " + str(data_end) +
               ", next header at " + str(following.header_offset) + ")",
           current.name);
    }
  }
}

}  // namespace

std::vector<ZipEntry> read_zip_entries(const ByteSource& source, int threads) {
  const uint64_t size = source.size();
  if (size < kEocdSize) {
    fail("not a zip archive: " + str(size) + " bytes is too short for an end record");
  }
  // Archives without a comment (every torch writer) end with the end record; only
  // otherwise search the tail, which may overlap the last record's data.
  uint64_t tail_start = size - kEocdSize;
  std::vector<uint8_t> tail = source.read(tail_start, kEocdSize);
  int64_t eocd_at = find_eocd(tail);
  if (eocd_at < 0) {
    const uint64_t tail_length = std::min(size, kEocdSize + kMaxComment);
    tail_start = size - tail_length;
    tail = source.read(tail_start, tail_length);
    eocd_at = find_eocd(tail);
  }
  if (eocd_at < 0) fail("not a zip archive: no end-of-central-directory record");
  const uint64_t eocd_offset = tail_start + static_cast<uint64_t>(eocd_at);
  const uint8_t* eocd = tail.data() + eocd_at;
  uint64_t disk = u16(eocd + 4);
  uint64_t cd_disk = u16(eocd + 6);
  uint64_t entries_on_disk = u16(eocd + 8);
  uint64_t entries = u16(eocd + 10);
  uint64_t cd_size = u32(eocd + 12);
  uint64_t cd_offset = u32(eocd + 16);
  uint64_t cd_limit = eocd_offset;

  bool has_locator = false;
  if (eocd_offset >= kZip64LocatorSize) {
    const std::vector<uint8_t> signature = source.read(eocd_offset - kZip64LocatorSize, 4);
    has_locator = has_signature(signature.data(), 6, 7);
  }
  if (has_locator) {
    const uint64_t locator_offset = eocd_offset - kZip64LocatorSize;
    const std::vector<uint8_t> locator = source.read(locator_offset, kZip64LocatorSize);
    const uint64_t zip64_offset = u64(locator.data() + 8);
    if (zip64_offset > locator_offset || locator_offset - zip64_offset < kZip64EocdSize) {
      fail("zip64 end record offset " + str(zip64_offset) + " points past its locator at " +
           str(locator_offset));
    }
    const std::vector<uint8_t> record = source.read(zip64_offset, kZip64EocdSize);
    if (!has_signature(record.data(), 6, 6)) {
      fail("no zip64 end record at offset " + str(zip64_offset));
    }
    disk = u32(record.data() + 16);
    cd_disk = u32(record.data() + 20);
    entries_on_disk = u64(record.data() + 24);
    entries = u64(record.data() + 32);
    cd_size = u64(record.data() + 40);
    cd_offset = u64(record.data() + 48);
    cd_limit = zip64_offset;
  } else if (cd_size == kU32Max || cd_offset == kU32Max || entries == kU16Max ||
             entries_on_disk == kU16Max) {
    fail("end record uses zip64 markers but there is no zip64 end record");
  }

  if (disk != 0 || cd_disk != 0 || entries_on_disk != entries) {
    fail("multi-disk zip archives are not supported");
  }
  if (cd_offset > cd_limit || cd_size > cd_limit - cd_offset) {
    fail("central directory (offset " + str(cd_offset) + ", " + str(cd_size) +
         " bytes) runs past its end record at offset " + str(cd_limit));
  }
  if (entries > cd_size / kCentralSize) {
    fail("central directory declares " + str(entries) + " entries but its " + str(cd_size) +
         " bytes hold fewer");
  }
  const std::vector<uint8_t> directory = source.read(cd_offset, cd_size);
  // The central directory first (no I/O), stopping at its first fault; then every local
  // header up to there, on several threads. The fault reported is the one a serial reader
  // meets first: entry by entry, central record, then local header, then the duplicate check.
  std::vector<ZipEntry> result;
  result.reserve(static_cast<size_t>(entries));
  // Views into `result`'s names, which stay put: `result` never grows past its reservation.
  std::unordered_set<std::string_view> seen;
  seen.reserve(static_cast<size_t>(entries));
  std::exception_ptr central_error;
  uint64_t pos = 0;
  for (uint64_t i = 0; i < entries; ++i) {
    try {
      result.push_back(parse_central(directory, pos, cd_offset));
    } catch (const CheckpointError&) {
      central_error = std::current_exception();
      break;
    }
    if (!seen.insert(result.back().name).second) {
      central_error = std::make_exception_ptr(CheckpointError(
          ErrorKind::kCorrupt, "record '" + result.back().name + "' appears twice in the central directory"));
      break;
    }
  }
  std::vector<std::exception_ptr> local_errors(result.size());
  parallel_for<NoScratch>(result.size(), threads, [&](size_t i, NoScratch&) {
    try {
      resolve_local(result[i], source, cd_offset);
    } catch (const CheckpointError&) {
      local_errors[i] = std::current_exception();
    }
  });
  // Every entry in `result` had its local header read before the central fault (which is at
  // the next entry) or the duplicate check (which is of the last one), as a serial reader.
  for (const std::exception_ptr& error : local_errors) {
    if (error) std::rethrow_exception(error);
  }
  if (central_error) std::rethrow_exception(central_error);
  check_no_overlap(result);
  return result;
}

}  // namespace pyckpt

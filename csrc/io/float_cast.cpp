#include "io/float_cast.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <system_error>

#include "core/parallel.h"
#include "io/crc32.h"

namespace pyckpt {
namespace {

// 64 Ki elements: a chunk read into the scratch buffer is cast while it is still in L2.
constexpr uint64_t kChunkElements = uint64_t{1} << 16;

uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

float float_of(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

float half_to_float(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000) << 16;
  const uint32_t exponent = (half >> 10) & 0x1f;
  const uint32_t mantissa = half & 0x3ff;
  if (exponent == 0x1f) return float_of(sign | 0x7f800000 | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t float_to_half(float value) {
  const uint32_t bits = bits_of(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  uint32_t magnitude = bits & 0x7fffffff;
  if (magnitude > 0x7f800000) return sign | 0x7e00 | ((magnitude >> 13) & 0x1ff);  // quiet NaN
  if (magnitude >= 0x477ff000) return sign | 0x7c00;  // 65520 and up round to infinity
  if (magnitude >= 0x38800000) {                      // a normal half
    magnitude += 0xc8000fffu + ((magnitude >> 13) & 1);  // rebias by -112 and round to even
    return static_cast<uint16_t>(sign | (magnitude >> 13));
  }
  if (magnitude < 0x33000000) return sign;  // at most 2^-25: rounds to zero
  // A subnormal half: round mantissa * 2^(exponent - 126) to an integer, ties to even.
  const uint32_t mantissa = (magnitude & 0x7fffff) | 0x800000;
  const uint32_t shift = 126 - (magnitude >> 23);
  const uint32_t rest = mantissa & ((1u << shift) - 1);
  const uint32_t halfway = 1u << (shift - 1);
  uint32_t result = mantissa >> shift;
  if (rest > halfway || (rest == halfway && (result & 1))) ++result;
  return static_cast<uint16_t>(sign | result);
}

// Branch-free, so the loops below vectorise: a NaN selects its quieted top half.
inline uint16_t float_to_bfloat16(float value) {
  const uint32_t bits = bits_of(value);
  const uint32_t rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
  const uint32_t quiet = (bits >> 16) | 0x40;
  return static_cast<uint16_t>((bits & 0x7fffffff) > 0x7f800000 ? quiet : rounded);
}

// The hot pair (fp32 checkpoints into bf16) gets its own loop, built for AVX2 as well where
// the CPU has it (chosen once at load time, so the binary still runs on any x86-64).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void float32_to_bfloat16(const uint8_t* source, uint8_t* dest, uint64_t count) {
  for (uint64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, source + 4 * i, 4);
    const uint32_t rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    const uint32_t quiet = (bits >> 16) | 0x40;
    const uint16_t out = static_cast<uint16_t>((bits & 0x7fffffff) > 0x7f800000 ? quiet : rounded);
    std::memcpy(dest + 2 * i, &out, 2);
  }
}

// A float8 format's 256 values, from its layout: exponent and mantissa widths, bias, and
// which encodings are NaN or infinite.
struct Float8Layout {
  int exponent_bits, mantissa_bits, bias;
  bool ieee_specials;     // all-ones exponent: infinity (mantissa 0) or NaN, as in IEEE
  bool all_ones_is_nan;   // S.1111.111 is NaN, no infinities (the "fn" formats)
  bool negative_zero_is_nan;  // 0x80 is the only NaN (the "fnuz" formats)
  bool has_sign;
};

std::array<float, 256> float8_table(const Float8Layout& layout) {
  std::array<float, 256> table{};
  const int mantissa_mask = (1 << layout.mantissa_bits) - 1;
  const int exponent_max = (1 << layout.exponent_bits) - 1;
  for (int code = 0; code < 256; ++code) {
    const bool negative = layout.has_sign && (code & 0x80);
    const int magnitude = layout.has_sign ? code & 0x7f : code;
    const int exponent = magnitude >> layout.mantissa_bits;
    const int mantissa = magnitude & mantissa_mask;
    float value;
    if (layout.negative_zero_is_nan && code == 0x80) {
      value = NAN;
    } else if (layout.all_ones_is_nan && magnitude == 0xff >> (layout.has_sign ? 1 : 0)) {
      value = NAN;
    } else if (layout.ieee_specials && exponent == exponent_max) {
      value = mantissa ? NAN : INFINITY;
    } else if (exponent == 0 && layout.mantissa_bits > 0) {
      value = std::ldexp(static_cast<float>(mantissa), 1 - layout.bias - layout.mantissa_bits);
    } else {
      value = std::ldexp(1.0f + static_cast<float>(mantissa) / static_cast<float>(1 << layout.mantissa_bits),
                         exponent - layout.bias);
    }
    table[code] = negative ? -value : value;
  }
  return table;
}

const std::array<float, 256>& table_for(FloatFormat format) {
  static const std::array<float, 256> e4m3fn = float8_table({4, 3, 7, false, true, false, true});
  static const std::array<float, 256> e5m2 = float8_table({5, 2, 15, true, false, false, true});
  static const std::array<float, 256> e4m3fnuz = float8_table({4, 3, 8, false, false, true, true});
  static const std::array<float, 256> e5m2fnuz = float8_table({5, 2, 16, false, false, true, true});
  static const std::array<float, 256> e8m0fnu = float8_table({8, 0, 127, false, true, false, false});
  switch (format) {
    case FloatFormat::kFloat8E4M3FN: return e4m3fn;
    case FloatFormat::kFloat8E5M2: return e5m2;
    case FloatFormat::kFloat8E4M3FNUZ: return e4m3fnuz;
    case FloatFormat::kFloat8E5M2FNUZ: return e5m2fnuz;
    default: return e8m0fnu;
  }
}

// Unaligned-safe loads and stores: a storage's bytes need not sit at an aligned address.
template <typename T>
T load(const uint8_t* at) {
  T value;
  std::memcpy(&value, at, sizeof value);
  return value;
}

template <typename T>
void store(uint8_t* at, T value) {
  std::memcpy(at, &value, sizeof value);
}

float widen(const uint8_t* source, FloatFormat from, uint64_t i) {
  switch (from) {
    case FloatFormat::kFloat64: return static_cast<float>(load<double>(source + 8 * i));
    case FloatFormat::kFloat32: return load<float>(source + 4 * i);
    case FloatFormat::kFloat16: return half_to_float(load<uint16_t>(source + 2 * i));
    case FloatFormat::kBFloat16: return float_of(static_cast<uint32_t>(load<uint16_t>(source + 2 * i)) << 16);
    default: return table_for(from)[source[i]];
  }
}

template <typename Narrow>
void cast_loop(const uint8_t* source, FloatFormat from, uint8_t* dest, uint64_t count, Narrow narrow) {
  switch (from) {  // the common sources get loops the compiler can vectorise
    case FloatFormat::kFloat32:
      for (uint64_t i = 0; i < count; ++i) narrow(dest, i, load<float>(source + 4 * i));
      return;
    case FloatFormat::kBFloat16:
      for (uint64_t i = 0; i < count; ++i) {
        narrow(dest, i, float_of(static_cast<uint32_t>(load<uint16_t>(source + 2 * i)) << 16));
      }
      return;
    default:
      for (uint64_t i = 0; i < count; ++i) narrow(dest, i, widen(source, from, i));
  }
}

}  // namespace

FloatFormat float_format_named(const std::string& name) {
  if (name == "float64") return FloatFormat::kFloat64;
  if (name == "float32") return FloatFormat::kFloat32;
  if (name == "float16") return FloatFormat::kFloat16;
  if (name == "bfloat16") return FloatFormat::kBFloat16;
  if (name == "float8_e4m3fn") return FloatFormat::kFloat8E4M3FN;
  if (name == "float8_e5m2") return FloatFormat::kFloat8E5M2;
  if (name == "float8_e4m3fnuz") return FloatFormat::kFloat8E4M3FNUZ;
  if (name == "float8_e5m2fnuz") return FloatFormat::kFloat8E5M2FNUZ;
  if (name == "float8_e8m0fnu") return FloatFormat::kFloat8E8M0FNU;
  throw std::invalid_argument("no floating-point cast for dtype " + name);
}

uint64_t format_bytes(FloatFormat format) {
  switch (format) {
    case FloatFormat::kFloat64: return 8;
    case FloatFormat::kFloat32: return 4;
    case FloatFormat::kFloat16:
    case FloatFormat::kBFloat16: return 2;
    default: return 1;
  }
}

bool is_cast_target(FloatFormat format) {
  return format == FloatFormat::kFloat32 || format == FloatFormat::kFloat16 || format == FloatFormat::kBFloat16;
}

void cast_elements(const uint8_t* source, FloatFormat from, uint8_t* dest, FloatFormat to, uint64_t count) {
  if (!is_cast_target(to)) throw std::invalid_argument("casts go to float32, float16 or bfloat16 only");
  if (from == to) {
    std::memcpy(dest, source, count * format_bytes(to));
    return;
  }
  switch (to) {
    case FloatFormat::kFloat32:
      cast_loop(source, from, dest, count, [](uint8_t* out, uint64_t i, float v) { store<float>(out + 4 * i, v); });
      return;
    case FloatFormat::kFloat16:
      cast_loop(source, from, dest, count,
                [](uint8_t* out, uint64_t i, float v) { store<uint16_t>(out + 2 * i, float_to_half(v)); });
      return;
    default:
      if (from == FloatFormat::kFloat32) {
        float32_to_bfloat16(source, dest, count);
        return;
      }
      cast_loop(source, from, dest, count,
                [](uint8_t* out, uint64_t i, float v) { store<uint16_t>(out + 2 * i, float_to_bfloat16(v)); });
  }
}

namespace {

struct Piece {
  size_t job;
  uint64_t first;  // element
  uint64_t count;
};

template <typename Job>
std::vector<Piece> pieces_of(const std::vector<Job>& jobs) {
  std::vector<Piece> pieces;
  for (size_t j = 0; j < jobs.size(); ++j) {
    for (uint64_t first = 0; first < jobs[j].count; first += kChunkElements) {
      pieces.push_back({j, first, std::min(kChunkElements, jobs[j].count - first)});
    }
  }
  return pieces;
}

struct CastScratch {
  std::vector<uint8_t> source, dest;
};

}  // namespace

void parallel_cast_read(const ByteSource& source, const std::vector<CastReadJob>& jobs, int threads) {
  for (const CastReadJob& job : jobs) {
    if (!is_cast_target(job.to)) throw std::invalid_argument("casts go to float32, float16 or bfloat16 only");
    source.check_range(job.offset, job.count * format_bytes(job.from), "cast");
  }
  const std::vector<Piece> pieces = pieces_of(jobs);
  parallel_for<CastScratch>(pieces.size(), threads, [&](size_t i, CastScratch& scratch) {
    const Piece& piece = pieces[i];
    const CastReadJob& job = jobs[piece.job];
    const uint64_t in = format_bytes(job.from), out = format_bytes(job.to);
    scratch.source.resize(piece.count * in);
    source.read_into(job.offset + piece.first * in, piece.count * in, scratch.source.data());
    cast_elements(scratch.source.data(), job.from, job.dest + piece.first * out, job.to, piece.count);
  });
}

std::vector<uint32_t> cast_copy_ranges(int source_fd, int dest_fd, const std::vector<CastCopyJob>& jobs, int threads) {
  for (const CastCopyJob& job : jobs) {
    if (!is_cast_target(job.to)) throw std::invalid_argument("casts go to float32, float16 or bfloat16 only");
  }
  const std::vector<Piece> pieces = pieces_of(jobs);
  std::vector<uint32_t> piece_crcs(pieces.size(), 0);
  parallel_for<CastScratch>(pieces.size(), threads, [&](size_t i, CastScratch& scratch) {
    const Piece& piece = pieces[i];
    const CastCopyJob& job = jobs[piece.job];
    const uint64_t in = format_bytes(job.from), out = format_bytes(job.to);
    scratch.source.resize(piece.count * in);
    scratch.dest.resize(piece.count * out);
    pread_exact(source_fd, scratch.source.data(), scratch.source.size(), job.source_offset + piece.first * in);
    cast_elements(scratch.source.data(), job.from, scratch.dest.data(), job.to, piece.count);
    piece_crcs[i] = crc32_update(0, scratch.dest.data(), scratch.dest.size());
    pwrite_all(dest_fd, scratch.dest.data(), scratch.dest.size(), job.dest_offset + piece.first * out);
  });
  std::vector<uint32_t> crcs(jobs.size(), 0);
  for (size_t i = 0; i < pieces.size(); ++i) {  // pieces are in job order, each job's in element order
    const Piece& piece = pieces[i];
    const uint64_t length = piece.count * format_bytes(jobs[piece.job].to);
    crcs[piece.job] = piece.first == 0 ? piece_crcs[i] : crc32_combine(crcs[piece.job], piece_crcs[i], length);
  }
  return crcs;
}

}  // namespace pyckpt

// A small coverage-guided fuzzing driver for machines without libFuzzer (g++ only).
//
// It speaks a subset of libFuzzer's command line, so tests/fuzz/native_fuzz.py drives both
// the same way:
//   driver [-max_total_time=S] [-runs=N] [-seed=N] [-max_len=N] [-timeout=S]
//          [-artifact_prefix=DIR/] [-dict=FILE] [-rss_limit_mb=N] CORPUS_DIR... | FILE...
// With directories it loads them as the corpus, mutates, and writes inputs that reach new
// coverage into the first directory. With files it replays each once and exits.
//
// Coverage comes from g++'s -fsanitize-coverage=trace-pc on the code under test: every
// basic block calls __sanitizer_cov_trace_pc below, which counts edges (pairs of blocks) in
// a hashed map bucketed like AFL's. This file itself is compiled without that flag.
//
// A finding (sanitizer report, abort, crash signal, timeout, rss over the limit) writes the
// input to ARTIFACT_PREFIX{crash,timeout,oom}-<hash> and exits non-zero. "Done N runs in S
// second(s)" is printed at the end, as libFuzzer does.

#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <unordered_set>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
extern "C" void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

namespace {

constexpr size_t kMapSize = 1 << 16;
uint8_t g_counters[kMapSize];
thread_local uintptr_t g_previous = 0;

}  // namespace

extern "C" void __sanitizer_cov_trace_pc(void) {
  const uintptr_t pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  const uintptr_t location = (pc ^ (pc >> 16)) * 0x9E3779B1u;
  const size_t edge = (location ^ g_previous) & (kMapSize - 1);
  g_previous = location >> 1;
  if (g_counters[edge] != 255) ++g_counters[edge];
}

namespace {

struct Options {
  double max_total_time = 0;  // 0: unlimited (with directories) until -runs
  uint64_t runs = 0;          // 0: unlimited
  uint64_t seed = 0;
  size_t max_len = 64 << 10;
  unsigned timeout = 20;
  uint64_t rss_limit_mb = 2048;
  std::string artifact_prefix = "./";
  std::string dict;
  std::vector<std::string> inputs;
};

// The input being run, for the crash handlers.
const uint8_t* g_current = nullptr;
size_t g_current_size = 0;
std::string g_artifact_prefix = "./";

uint64_t fnv1a(const uint8_t* data, size_t size) {
  uint64_t hash = 1469598103934665603ull;
  for (size_t i = 0; i < size; ++i) hash = (hash ^ data[i]) * 1099511628211ull;
  return hash;
}

// Async-signal-safe enough: open/write/close only.
void save_artifact(const char* kind) {
  if (g_current == nullptr) return;
  char path[4096];
  std::snprintf(path, sizeof(path), "%s%s-%016llx", g_artifact_prefix.c_str(), kind,
                static_cast<unsigned long long>(fnv1a(g_current, g_current_size)));
  FILE* out = std::fopen(path, "wb");
  if (out != nullptr) {
    std::fwrite(g_current, 1, g_current_size, out);
    std::fclose(out);
  }
  std::fprintf(stderr, "==driver== %s: input of %zu bytes saved to %s\n", kind, g_current_size, path);
}

void on_death() { save_artifact("crash"); }

void on_signal(int signal) {
  if (signal == SIGALRM) {
    save_artifact("timeout");
    std::fprintf(stderr, "==driver== ERROR: timeout\n");
    _exit(70);
  }
  save_artifact("crash");
  std::fprintf(stderr, "==driver== ERROR: deadly signal %d\n", signal);
  _exit(71);
}

bool parse_flag(const std::string& arg, const char* name, std::string& value) {
  const std::string prefix = std::string("-") + name + "=";
  if (arg.compare(0, prefix.size(), prefix) != 0) return false;
  value = arg.substr(prefix.size());
  return true;
}

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    std::string value;
    if (parse_flag(arg, "max_total_time", value)) {
      options.max_total_time = std::stod(value);
    } else if (parse_flag(arg, "runs", value)) {
      options.runs = std::stoull(value);
    } else if (parse_flag(arg, "seed", value)) {
      options.seed = std::stoull(value);
    } else if (parse_flag(arg, "max_len", value)) {
      options.max_len = std::stoull(value);
    } else if (parse_flag(arg, "timeout", value)) {
      options.timeout = static_cast<unsigned>(std::stoul(value));
    } else if (parse_flag(arg, "rss_limit_mb", value)) {
      options.rss_limit_mb = std::stoull(value);
    } else if (parse_flag(arg, "artifact_prefix", value)) {
      options.artifact_prefix = value;
    } else if (parse_flag(arg, "dict", value)) {
      options.dict = value;
    } else if (!arg.empty() && arg[0] == '-') {
      std::fprintf(stderr, "==driver== ignoring flag %s\n", arg.c_str());
    } else {
      options.inputs.push_back(arg);
    }
  }
  return options;
}

bool is_directory(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::vector<std::string> list_files(const std::string& directory) {
  std::vector<std::string> files;
  DIR* dir = ::opendir(directory.c_str());
  if (dir == nullptr) return files;
  while (dirent* entry = ::readdir(dir)) {
    const std::string name = entry->d_name;
    if (name == "." || name == "..") continue;
    const std::string path = directory + "/" + name;
    if (!is_directory(path)) files.push_back(path);
  }
  ::closedir(dir);
  std::sort(files.begin(), files.end());
  return files;
}

// libFuzzer dictionary format: lines of  name="token"  with \\, \" and \xNN escapes.
std::vector<std::vector<uint8_t>> read_dict(const std::string& path) {
  std::vector<std::vector<uint8_t>> tokens;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    const size_t open = line.find('"');
    const size_t close = line.rfind('"');
    if (line.empty() || line[0] == '#' || open == std::string::npos || close <= open) continue;
    std::vector<uint8_t> token;
    for (size_t i = open + 1; i < close; ++i) {
      if (line[i] == '\\' && i + 1 < close) {
        if (line[i + 1] == 'x' && i + 3 < close) {
          token.push_back(static_cast<uint8_t>(std::stoi(line.substr(i + 2, 2), nullptr, 16)));
          i += 3;
        } else {
          token.push_back(static_cast<uint8_t>(line[i + 1]));
          i += 1;
        }
      } else {
        token.push_back(static_cast<uint8_t>(line[i]));
      }
    }
    if (!token.empty()) tokens.push_back(std::move(token));
  }
  return tokens;
}

uint64_t rss_mb() {
  rusage usage {};
  ::getrusage(RUSAGE_SELF, &usage);
  return static_cast<uint64_t>(usage.ru_maxrss) / 1024;
}

class Fuzzer {
 public:
  Fuzzer(const Options& options) : options_(options), rng_(options.seed ? options.seed : std::random_device{}()) {
    if (!options.dict.empty()) dict_ = read_dict(options.dict);
  }

  // Runs one input; returns true if it reached coverage never seen before.
  bool run(const std::vector<uint8_t>& input) {
    std::memset(g_counters, 0, sizeof(g_counters));
    g_previous = 0;
    // A private copy, so reads past the end hit ASan's redzone.
    std::vector<uint8_t> copy(input);
    g_current = copy.data();
    g_current_size = copy.size();
    if (options_.timeout) ::alarm(options_.timeout);
    LLVMFuzzerTestOneInput(copy.empty() ? nullptr : copy.data(), copy.size());
    if (options_.timeout) ::alarm(0);
    ++executions_;
    if (options_.rss_limit_mb && (executions_ & 63) == 0 && rss_mb() > options_.rss_limit_mb) {
      save_artifact("oom");
      std::fprintf(stderr, "==driver== ERROR: rss %llu MB over the %llu MB limit\n",
                   static_cast<unsigned long long>(rss_mb()),
                   static_cast<unsigned long long>(options_.rss_limit_mb));
      _exit(72);
    }
    g_current = nullptr;
    bool fresh = false;
    for (size_t i = 0; i < kMapSize; ++i) {
      if (!g_counters[i]) continue;
      const uint32_t feature = static_cast<uint32_t>(i) * 8 + bucket(g_counters[i]);
      if (features_.insert(feature).second) fresh = true;
    }
    return fresh;
  }

  int replay(const std::vector<std::string>& files) {
    for (const std::string& file : files) {
      std::fprintf(stderr, "==driver== running %s\n", file.c_str());
      run(read_file(file));
    }
    std::printf("Done %llu runs in 0 second(s)\n", static_cast<unsigned long long>(executions_));
    return 0;
  }

  int fuzz(const std::vector<std::string>& directories) {
    const auto start = std::chrono::steady_clock::now();
    for (const std::string& directory : directories) {
      for (const std::string& file : list_files(directory)) {
        std::vector<uint8_t> input = read_file(file);
        if (input.size() > options_.max_len) input.resize(options_.max_len);
        if (run(input)) corpus_.push_back(std::move(input));
      }
    }
    if (corpus_.empty()) corpus_.push_back({});
    std::fprintf(stderr, "==driver== INITED corpus %zu inputs, %zu features\n", corpus_.size(),
                 features_.size());
    auto last_report = start;
    std::vector<uint8_t> input;
    while (true) {
      const auto now = std::chrono::steady_clock::now();
      const double elapsed = std::chrono::duration<double>(now - start).count();
      if (options_.max_total_time > 0 && elapsed >= options_.max_total_time) break;
      if (options_.runs && executions_ >= options_.runs) break;
      if (std::chrono::duration<double>(now - last_report).count() >= 10) {
        last_report = now;
        std::fprintf(stderr, "==driver== #%llu corpus %zu features %zu exec/s %.0f rss %lluMB\n",
                     static_cast<unsigned long long>(executions_), corpus_.size(), features_.size(),
                     executions_ / std::max(elapsed, 1e-3),
                     static_cast<unsigned long long>(rss_mb()));
      }
      input = corpus_[pick(corpus_.size())];
      const int stacked = 1 + static_cast<int>(pick(6));
      for (int i = 0; i < stacked; ++i) mutate(input);
      if (input.size() > options_.max_len) input.resize(options_.max_len);
      if (run(input)) {
        corpus_.push_back(input);
        if (!directories.empty()) save_to(directories[0], input);
      }
    }
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr, "==driver== corpus %zu features %zu\n", corpus_.size(), features_.size());
    std::printf("Done %llu runs in %.0f second(s)\n", static_cast<unsigned long long>(executions_),
                elapsed);
    return 0;
  }

 private:
  static uint32_t bucket(uint8_t count) {
    if (count <= 3) return count - 1;
    if (count <= 7) return 3;
    if (count <= 15) return 4;
    if (count <= 31) return 5;
    if (count <= 127) return 6;
    return 7;
  }

  size_t pick(size_t n) { return n ? static_cast<size_t>(rng_() % n) : 0; }

  void save_to(const std::string& directory, const std::vector<uint8_t>& input) {
    char name[32];
    std::snprintf(name, sizeof(name), "%016llx",
                  static_cast<unsigned long long>(fnv1a(input.data(), input.size())));
    std::ofstream out(directory + "/" + name, std::ios::binary);
    out.write(reinterpret_cast<const char*>(input.data()), static_cast<std::streamsize>(input.size()));
  }

  void mutate(std::vector<uint8_t>& data) {
    static const uint64_t kInteresting[] = {0,          1,          0x7F,       0x80,
                                            0xFF,       0x100,      0x7FFF,     0x8000,
                                            0xFFFF,     0x10000,    0x7FFFFFFF, 0x80000000,
                                            0xFFFFFFFF, 0x100000000ull, 0x7FFFFFFFFFFFFFFFull,
                                            0x8000000000000000ull, ~0ull, 64, 1000, 30};
    const size_t size = data.size();
    switch (pick(13)) {
      case 0:  // flip a bit
        if (size) data[pick(size)] ^= static_cast<uint8_t>(1u << pick(8));
        break;
      case 1:  // random byte
        if (size) data[pick(size)] = static_cast<uint8_t>(rng_());
        break;
      case 2: {  // insert random bytes
        const size_t n = 1 + pick(8);
        const size_t at = pick(size + 1);
        std::vector<uint8_t> bytes(n);
        for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng_());
        data.insert(data.begin() + static_cast<std::ptrdiff_t>(at), bytes.begin(), bytes.end());
        break;
      }
      case 3: {  // erase a range
        if (!size) break;
        const size_t at = pick(size);
        const size_t n = 1 + pick(std::min<size_t>(size - at, 64));
        data.erase(data.begin() + static_cast<std::ptrdiff_t>(at),
                   data.begin() + static_cast<std::ptrdiff_t>(at + n));
        break;
      }
      case 4: {  // copy a range over another place
        if (size < 2) break;
        const size_t from = pick(size);
        const size_t to = pick(size);
        const size_t n = 1 + pick(std::min<size_t>({size - from, size - to, 64}));
        std::memmove(data.data() + to, data.data() + from, n);
        break;
      }
      case 5:    // interesting integer, 1/2/4/8 bytes little-endian
      case 6: {  // (twice as likely: sizes and offsets are what the readers trust)
        if (!size) break;
        const size_t width = size_t{1} << pick(4);
        if (width > size) break;
        const size_t at = pick(size - width + 1);
        const uint64_t value = kInteresting[pick(sizeof(kInteresting) / sizeof(kInteresting[0]))];
        for (size_t i = 0; i < width; ++i) data[at + i] = static_cast<uint8_t>(value >> (8 * i));
        break;
      }
      case 7: {  // add or subtract a small delta to a little-endian integer
        if (!size) break;
        const size_t width = size_t{1} << pick(4);
        if (width > size) break;
        const size_t at = pick(size - width + 1);
        uint64_t value = 0;
        for (size_t i = 0; i < width; ++i) value |= static_cast<uint64_t>(data[at + i]) << (8 * i);
        const int64_t delta = static_cast<int64_t>(pick(33)) - 16;
        value += static_cast<uint64_t>(delta);
        for (size_t i = 0; i < width; ++i) data[at + i] = static_cast<uint8_t>(value >> (8 * i));
        break;
      }
      case 8:    // insert a dictionary token
      case 9: {  // or overwrite with one
        if (dict_.empty()) break;
        const std::vector<uint8_t>& token = dict_[pick(dict_.size())];
        const size_t at = pick(size + 1);
        if (pick(2) == 0 || at + token.size() > size) {
          data.insert(data.begin() + static_cast<std::ptrdiff_t>(at), token.begin(), token.end());
        } else {
          std::copy(token.begin(), token.end(), data.begin() + static_cast<std::ptrdiff_t>(at));
        }
        break;
      }
      case 10: {  // splice with another corpus input
        const std::vector<uint8_t>& other = corpus_[pick(corpus_.size())];
        if (other.empty()) break;
        const size_t from = pick(other.size());
        const size_t n = 1 + pick(other.size() - from);
        const size_t at = pick(size + 1);
        if (pick(2) == 0) {
          data.insert(data.begin() + static_cast<std::ptrdiff_t>(at), other.begin() + static_cast<std::ptrdiff_t>(from),
                      other.begin() + static_cast<std::ptrdiff_t>(from + n));
        } else {
          data.resize(at);
          data.insert(data.end(), other.begin() + static_cast<std::ptrdiff_t>(from), other.end());
        }
        break;
      }
      case 11:  // truncate
        if (size) data.resize(pick(size));
        break;
      default: {  // repeat a byte run (deep nesting, long strings)
        if (!size) break;
        const size_t at = pick(size);
        const size_t n = 1 + pick(std::min<size_t>(size - at, 8));
        const size_t times = 1 + pick(256);
        std::vector<uint8_t> run(data.begin() + static_cast<std::ptrdiff_t>(at),
                                 data.begin() + static_cast<std::ptrdiff_t>(at + n));
        for (size_t i = 0; i < times; ++i) {
          data.insert(data.begin() + static_cast<std::ptrdiff_t>(at), run.begin(), run.end());
        }
        break;
      }
    }
  }

  const Options& options_;
  std::mt19937_64 rng_;
  std::vector<std::vector<uint8_t>> corpus_;
  std::vector<std::vector<uint8_t>> dict_;
  std::unordered_set<uint32_t> features_;
  uint64_t executions_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  g_artifact_prefix = options.artifact_prefix;
  // Under a sanitizer its own handlers report crash signals and then call on_death; abort
  // (the harness's findings) and the timeout alarm are always ours.
  std::vector<int> signals = {SIGABRT, SIGALRM};
  if (__sanitizer_set_death_callback) {
    __sanitizer_set_death_callback(on_death);
  } else {
    signals.insert(signals.end(), {SIGSEGV, SIGBUS, SIGILL, SIGFPE});
  }
  for (int signal : signals) {
    struct sigaction action {};
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    ::sigaction(signal, &action, nullptr);
  }
  Fuzzer fuzzer(options);
  std::vector<std::string> directories, files;
  for (const std::string& input : options.inputs) {
    (is_directory(input) ? directories : files).push_back(input);
  }
  if (!files.empty()) return fuzzer.replay(files);
  return fuzzer.fuzz(directories);
}

// The native core's one error type. bindings.cpp turns it into pyckpt.CheckpointError
// (or a subclass, by kind) with the same message the Python backend produces.
#pragma once

#include <stdexcept>
#include <string>

namespace pyckpt {

enum class ErrorKind {
  kCorrupt,    // damaged or inconsistent input
  kUnsafe,     // input asks for something the weights-only rules refuse
  kTruncated,  // input ended before the structure it describes
};

class CheckpointError : public std::runtime_error {
 public:
  CheckpointError(ErrorKind kind, std::string message, std::string record = {})
      : std::runtime_error(message), kind_(kind), message_(std::move(message)),
        record_(std::move(record)) {}

  ErrorKind kind() const { return kind_; }
  // The whole message as raw bytes: what() stops at the first NUL, and record names in it
  // may be cp437 rather than UTF-8, so bindings decode this like a record name.
  const std::string& message() const { return message_; }
  // Raw bytes of the zip record name the problem sits in; empty when none.
  const std::string& record() const { return record_; }

 private:
  ErrorKind kind_;
  std::string message_;
  std::string record_;
};

[[noreturn]] inline void fail(std::string message, std::string record = {}) {
  throw CheckpointError(ErrorKind::kCorrupt, std::move(message), std::move(record));
}

}  // namespace pyckpt

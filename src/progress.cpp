#include "progress.hpp"

#include <cstdio>
#include <unistd.h>

namespace hesse::detail {

namespace {
thread_local bool muted = false;
}  // namespace

MutedProgress::MutedProgress() : previous_(muted) { muted = true; }
MutedProgress::~MutedProgress() { muted = previous_; }

Progress::Progress(std::string label, std::size_t total, bool enabled)
    : label_(std::move(label)), total_(total), active_(enabled && !muted),
      start_(std::chrono::steady_clock::now()), last_(start_) {}

Progress::~Progress() {
  if (!printed_) return;
  if (!shown_) print(std::chrono::steady_clock::now());  // the state it ended in
  std::fputc('\n', stderr);
}

void Progress::update(std::size_t done, const std::string& note) {
  if (!active_) return;
  if (done != done_ || note != note_) {
    done_ = done;
    note_ = note;
    shown_ = false;
  }
  const auto now = std::chrono::steady_clock::now();
  // a short run says nothing; a long one refreshes a few times a second
  if (now - start_ < std::chrono::milliseconds(500) || now - last_ < std::chrono::milliseconds(200)) return;
  if (!printed_ && isatty(STDERR_FILENO) != 1) {  // asked only now: most requests are short, and it is a system call
    active_ = false;
    return;
  }
  last_ = now;
  printed_ = true;
  print(now);
}

void Progress::print(std::chrono::steady_clock::time_point now) {
  shown_ = true;
  const double seconds = std::chrono::duration<double>(now - start_).count();
  if (total_)
    std::fprintf(stderr, "\rhesse: %s %zu/%zu (%.1f s) %s\033[K", label_.c_str(), done_, total_, seconds, note_.c_str());
  else
    std::fprintf(stderr, "\rhesse: %s %zu (%.1f s) %s\033[K", label_.c_str(), done_, seconds, note_.c_str());
  std::fflush(stderr);
}

}  // namespace hesse::detail

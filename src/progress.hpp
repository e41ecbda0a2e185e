#pragma once
// A one-line progress report on stderr for long runs (Lanczos, dataset
// passes, large dense Hessians); silent unless stderr is a terminal.
#include <chrono>
#include <cstddef>
#include <string>

namespace hesse::detail {

class Progress {
 public:
  /// `label` names the work ("lanczos"); `total` steps are expected (0 = unknown).
  Progress(std::string label, std::size_t total, bool enabled = true);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  /// `done` steps are finished; `note` is appended (e.g. the current residual).
  void update(std::size_t done, const std::string& note = "");

 private:
  void print(std::chrono::steady_clock::time_point now);
  std::string label_;
  std::size_t total_;
  bool active_;
  bool printed_ = false;
  std::size_t done_ = 0;  // as last updated, printed or not: the last line shows the end
  std::string note_;
  bool shown_ = false;  // whether the line on screen shows done_ and note_
  std::chrono::steady_clock::time_point start_, last_;
};

/// While one lives, this thread's Progress reports stay silent: helper threads
/// working for a request leave its report to the calling thread.
class MutedProgress {
 public:
  MutedProgress();
  ~MutedProgress();
  MutedProgress(const MutedProgress&) = delete;
  MutedProgress& operator=(const MutedProgress&) = delete;

 private:
  bool previous_;
};

}  // namespace hesse::detail

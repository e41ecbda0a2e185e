#pragma once
// What the benchmark programs share: timing like the PyTorch anchor (one
// warm-up, then repetitions for a time budget, median), JSON pieces, class
// targets, and running a workload in a child process so its peak RSS is its own.
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <hesse/hesse.hpp>

namespace bench {

inline double budget_s = 5.0;

inline double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Timing {
  double median_s, min_s, warmup_s;
  int reps;
};

/// One warm-up call, then repetitions filling the time budget (like the anchor).
inline Timing time_it(const std::function<void()>& fn) {
  double t0 = now();
  fn();
  const double warm = now() - t0;
  const int reps = warm > 8.0 ? 0 : warm < 2.0 ? std::max(3, std::min(200, int(budget_s / std::max(warm, 1e-6))))
                                               : std::max(1, std::min(3, int(15.0 / warm)));
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    t0 = now();
    fn();
    times.push_back(now() - t0);
  }
  if (times.empty()) times.push_back(warm);
  std::sort(times.begin(), times.end());
  return {times[times.size() / 2], times.front(), warm, int(times.size())};
}

/// The median over repetitions of time(b) / time(a), a and b run alternately
/// (after one warm-up each): on a shared machine whose speed drifts, a ratio of
/// two medians taken seconds apart can be off by more than the effect measured.
inline double paired_ratio(const std::function<void()>& a, const std::function<void()>& b, int reps = 200) {
  a();
  b();
  std::vector<double> ratios;
  for (int r = 0; r < reps; ++r) {
    double t0 = now();
    a();
    const double ta = now() - t0;
    t0 = now();
    b();
    ratios.push_back((now() - t0) / ta);
  }
  std::sort(ratios.begin(), ratios.end());
  return ratios[ratios.size() / 2];
}

inline std::string timing_json(const Timing& t) {
  std::ostringstream os;
  os.precision(6);
  os << "{\"median_s\": " << t.median_s << ", \"min_s\": " << t.min_s << ", \"warmup_s\": " << t.warmup_s
     << ", \"reps\": " << t.reps << "}";
  return os.str();
}

/// Integer class targets stored as doubles, from a seeded generator.
inline hesse::Tensor class_targets(std::size_t n, std::size_t classes, hesse::Generator& gen) {
  hesse::Tensor t = hesse::Tensor::empty({n});
  for (std::size_t i = 0; i < n; ++i) t.mutable_data()[i] = std::floor(gen.uniform(0, double(classes)));
  return t;
}

/// Runs `workload` in a child process; returns its JSON object (which must end
/// in '}') with the child's peak RSS and page faults added.
inline std::string run_isolated(const std::function<std::string()>& workload) {
  int fds[2];
  if (pipe(fds) != 0) return "{\"status\": \"error\", \"error\": \"pipe\"}";
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    std::string out;
    try {
      out = workload();
    } catch (const std::exception& e) {
      out = std::string("{\"status\": \"error\", \"error\": \"") + e.what() + "\"}";
    }
    if (write(fds[1], out.data(), out.size()) < 0) _exit(2);
    close(fds[1]);
    _exit(0);
  }
  close(fds[1]);
  std::string out;
  char buf[4096];
  ssize_t got;
  while ((got = read(fds[0], buf, sizeof buf)) > 0) out.append(buf, std::size_t(got));
  close(fds[0]);
  int status = 0;
  struct rusage usage {};
  wait4(pid, &status, 0, &usage);
  if (out.empty()) return "{\"status\": \"error\", \"error\": \"child died\"}";
  std::ostringstream os;
  os << out.substr(0, out.size() - 1) << ", \"peak_rss_mb\": " << double(usage.ru_maxrss) / 1024.0
     << ", \"major_faults\": " << usage.ru_majflt << ", \"minor_faults\": " << usage.ru_minflt << "}";
  return os.str();
}

/// {"OPENBLAS_NUM_THREADS": ..., ...}: the settings that change timings.
inline std::string env_json() {
  std::ostringstream os;
  os << "{";
  const char* keys[] = {"OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "GLIBC_TUNABLES", "OMP_NUM_THREADS"};
  for (std::size_t i = 0; i < 4; ++i) {
    const char* v = std::getenv(keys[i]);
    os << (i ? ", " : "") << "\"" << keys[i] << "\": " << (v ? "\"" + std::string(v) + "\"" : "null");
  }
  os << "}";
  return os.str();
}

/// The workloads asked for by `--only name ...` (all by default); also reads
/// `--reps-budget seconds`. Prints the usage and returns nothing on bad arguments.
inline std::vector<std::string> workloads_from_args(int argc, char** argv, const std::vector<std::string>& all,
                                                    const char* program) {
  std::vector<std::string> only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--only") {
      while (i + 1 < argc && argv[i + 1][0] != '-') only.push_back(argv[++i]);
    } else if (a == "--reps-budget" && i + 1 < argc) {
      budget_s = std::atof(argv[++i]);
    } else {
      std::cerr << "usage: " << program << " [--only name ...] [--reps-budget seconds]\n";
      return {};
    }
  }
  return only.empty() ? all : only;
}

}  // namespace bench

#!/usr/bin/python3
"""Runs hesse's Hessian benchmark and the PyTorch anchor in one session, on the
same machine and memory setting, and prints both JSON objects with the ratios
ours / PyTorch's best method for every workload. With hvp_large it also runs
bench_curvature (matrix-free HVP, 20 power and 20 Lanczos steps, top-5, trace,
density) and compares its steps with the anchor's power iteration.

    /usr/bin/python3 scripts/bench_vs_torch.py --build build --anchor ../shared/anchors/anchor_torch.py \
        [--hugetlb] [--only mimo mlp_small_loss ...] [--out result.json]

--hugetlb runs both sides with GLIBC_TUNABLES=glibc.malloc.hugetlb=1.
Needs Debian's python3-torch for the anchor.
"""
import argparse
import json
import os
import subprocess
import sys

WORKLOADS = ["mimo", "mlp_small_loss", "mlp_medium_loss", "per_sample_model", "hvp_large"]


def best(methods, names=None):
    """(name, results) of the fastest successful method by median (among `names` if given)."""
    ok = [(m, r) for m, r in methods.items() if r.get("status") == "ok" and (names is None or m in names)]
    return min(ok, key=lambda x: x[1]["median_s"]) if ok else (None, {})


def compare(ours, theirs):
    """Ours against PyTorch's best method: the ratio of medians, and of minima
    (the shared host runs at half speed in bursts of seconds; a minimum is the
    time least touched by them)."""
    name, t = theirs
    out = {"ours_s": ours["median_s"], "torch_best": name, "torch_s": t.get("median_s"),
           "ratio": ours["median_s"] / t["median_s"] if t else None,
           "ours_min_s": ours.get("min_s"), "torch_min_s": t.get("min_s")}
    if t and ours.get("min_s") and t.get("min_s"):
        out["ratio_of_minima"] = ours["min_s"] / t["min_s"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build")
    ap.add_argument("--anchor", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "anchors",
                                                     "anchor_torch.py"))
    ap.add_argument("--only", nargs="*", default=WORKLOADS)
    ap.add_argument("--hugetlb", action="store_true")
    ap.add_argument("--method-timeout", type=int, default=90)
    ap.add_argument("--out", default="/tmp/hesse_vs_torch.json")
    a = ap.parse_args()
    env = dict(os.environ)
    if a.hugetlb:
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    ours = json.loads(subprocess.run([os.path.join(a.build, "bench", "bench_hessian"), "--only", *a.only],
                                     env=env, capture_output=True, text=True, check=True).stdout)
    curvature = None
    if "hvp_large" in a.only:
        curvature = json.loads(subprocess.run([os.path.join(a.build, "bench", "bench_curvature")], env=env,
                                              capture_output=True, text=True, check=True).stdout)
    anchor_out = a.out + ".anchor.json"
    subprocess.run(["/usr/bin/python3", a.anchor, "--only", *a.only, "--out", anchor_out,
                    "--method-timeout", str(a.method_timeout)], env=env, capture_output=True, text=True, check=True)
    with open(anchor_out) as fh:
        torch = json.load(fh)
    ratios = {}
    for w in a.only:
        mine = ours["workloads"].get(w, {})
        theirs = torch["workloads"].get(w, {}).get("methods", {})
        if w == "hvp_large":
            gradient = best(theirs, ["gradient"])
            hvp = best(theirs, [m for m in theirs if m.startswith("hvp_")])
            power = best(theirs, [m for m in theirs if m.startswith("power_iteration")])
            ratios[w] = {
                "gradient": compare(mine["gradient"], gradient),
                "hvp": compare(mine["hvp"], hvp),
                "power_iteration_20": compare(mine["power_iteration_20"], power),
                "ours_hvp_over_gradient": mine["hvp_over_gradient"],
            }
            steps = curvature["results"]["hvp_steps"]
            ratios["hvp_large_curvature"] = {
                "hvp": compare(steps["hvp"], hvp),
                "hvp_kept_graph_s": steps["hvp_kept_graph"]["median_s"],
                "ours_hvp_over_gradient": steps["hvp_over_gradient"],
                "ours_hvp_over_gradient_paired": steps.get("hvp_over_gradient_paired"),
                "power_iteration_20": compare(steps["power_iteration_20"], power),
                "lanczos_20": compare(steps["lanczos_20"], power),
                "top5_s": curvature["results"]["top5"]["top5"]["median_s"],
                "hutchinson_100_s": curvature["results"]["hutchinson_100"]["hutchinson"]["median_s"],
                "density_50_s": curvature["results"]["density_50"]["density"]["median_s"],
            }
        else:
            fastest = best(theirs)
            ratios[w] = compare(mine["timing"], fastest)
            ratios[w]["ours_peak_rss_mb"] = mine.get("peak_rss_mb")
            ratios[w]["torch_peak_rss_mb"] = fastest[1].get("peak_rss_mb")
    result = {"glibc_tunables": env.get("GLIBC_TUNABLES"), "ratios": ratios, "hesse": ours,
              "hesse_curvature": curvature, "torch": torch}
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=1)
    json.dump(ratios, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

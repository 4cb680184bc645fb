"""Summary lines for deploy/gpu/check.sh: PyTorch's measurements (pytorch.jsonl) and the
pipeline's stages (their manifests). Prints one line per item."""
import json
import statistics
import sys


def pytorch(path):
    for line in open(path):
        r = json.loads(line)
        ips = r["images_per_rep"] / statistics.median(r["seconds"])
        peak = r.get("gpu_peak_mib", 0)
        print(f"    pytorch {r['name']:<16} {ips:12.0f} per s   peak {peak:.0f} MiB")


def manifests(paths):
    for p in paths:
        m = json.load(open(p))
        acc = m.get("metrics", {}).get("test_accuracy", "-")
        print(f"    {m['stage']:<18} {m['wall_seconds']:8.1f} s  {m.get('device', '')}  test accuracy {acc}")


if __name__ == "__main__":
    kind, *paths = sys.argv[1:]
    try:
        pytorch(paths[0]) if kind == "pytorch" else manifests(paths)
    except (OSError, ValueError, KeyError) as e:
        print(f"    ({kind}: {e})")

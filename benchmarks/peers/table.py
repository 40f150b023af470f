"""Prints the peer benchmark's JSON rows (``peers.jsonl``) as a Markdown table."""

import json
import sys


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    rate = next((r["tflops"] for r in rows if r.get("row") == "matmul"), None)
    if rate:
        print(f"measured bf16 matrix rate: {rate:.0f} TFLOP/s")
    print("| implementation | blocks | total (ms) | first call / compile (s) | TFLOP/s | of rate |"
          " computed steps |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        name = r.get("row", "")
        if name.startswith("diffusers") and "seconds" in r:
            print(f"| {name} | {r['blocks']} | {1e3 * r['seconds']:.0f} | "
                  f"{r['first_call_s']:.1f} | {r['tflops']:.0f} | {r['of_matmul_rate']:.2f} | "
                  f"{len(r.get('computed_steps', [])) or '-'} |")
        elif name.startswith("diffusers FBC sweep"):
            sweep = ", ".join(f"{s['threshold']}: {len(s['computed_steps'])}" for s in r["sweep"])
            print(f"| FBC threshold sweep (threshold: computed steps) | {sweep} | | | | | |")
        elif name.startswith("jaxcache"):
            tag = f" [{r['tag']}]" if r.get("tag") else ""
            of = (lambda t: f"{t / rate:.2f}") if rate else (lambda t: "-")
            print(f"| {name}{tag}: uncached | {r['blocks']} | {1e3 * r['uncached_s']:.0f} | "
                  f"{r['uncached_compile_s']:.1f} | {r['uncached_tflops']:.0f} | "
                  f"{of(r['uncached_tflops'])} | - |")
            if "hand_loop_s" in r:
                print(f"| {name}{tag}: hand-written loop | {r['blocks']} | "
                      f"{1e3 * r['hand_loop_s']:.0f} | {r['hand_loop_compile_s']:.1f} | "
                      f"{r['hand_loop_tflops']:.0f} | {of(r['hand_loop_tflops'])} | - |")
            print(f"| {name}{tag}: cached | {r['blocks']} | {1e3 * r['cached_s']:.0f} | "
                  f"{r['compile_s']:.1f} | - | - | {r['refreshes']} |")


if __name__ == "__main__":
    main(sys.argv[1])

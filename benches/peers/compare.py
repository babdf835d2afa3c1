"""Prints tm (criterion estimates) against the Python package (JSON), per scenario."""
import json
import os
import sys


def criterion_ns(root, scenario):
    path = os.path.join(root, *scenario.split("/"), "new", "estimates.json")
    with open(path) as f:
        est = json.load(f)
    return est["median"]["point_estimate"]


def main():
    peer = json.load(open(sys.argv[1]))
    root = sys.argv[2]
    print("Python %s, transaction %s" % (peer["python"], peer["transaction"]))
    print("| scenario | tm | Python `transaction` | ratio |")
    print("|---|---:|---:|---:|")
    for scenario, py_ns in peer["ns"].items():
        try:
            tm_ns = criterion_ns(root, scenario)
        except FileNotFoundError:
            print("| %s | (not run) | %.0f ns | |" % (scenario, py_ns))
            continue
        print("| %s | %.0f ns | %.0f ns | %.1fx |" % (scenario, tm_ns, py_ns, py_ns / tm_ns))


if __name__ == "__main__":
    main()

"""Runs one question through the reference Recursive Language Model (PyPI `rlms`) and prints
its answer and wall time as one JSON line, for the side-by-side benchmark (rlm_reference.rs).

The root model is the OpenAI-compatible server at --root; sub-calls go to --sub when given
(the reference routes depth-1 calls to its one other backend), else to the root's server.
"""

import argparse
import json
import sys
import time

from rlm import RLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True, help="API base of the root model's server")
    parser.add_argument("--sub", help="API base of the server for sub-calls")
    parser.add_argument("--model", required=True)
    parser.add_argument("--context", required=True, help="a file holding the context")
    parser.add_argument("--question", required=True)
    args = parser.parse_args()

    def backend(api_base: str) -> dict:
        return {"model_name": args.model, "base_url": api_base, "api_key": "unused"}

    others = {}
    if args.sub:
        others = {"other_backends": ["openai"], "other_backend_kwargs": [backend(args.sub)]}
    with open(args.context, encoding="utf-8") as f:
        context = f.read()
    rlm = RLM(backend="openai", backend_kwargs=backend(args.root), environment="local", **others)
    started = time.perf_counter()
    result = rlm.completion(context, root_prompt=args.question)
    seconds = time.perf_counter() - started
    json.dump({"answer": result.response, "seconds": seconds}, sys.stdout)
    print()


if __name__ == "__main__":
    main()

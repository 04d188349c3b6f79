"""Dynamo alone (no fxprefetch): a compiled model's first calls, made from several threads at
once while each thread compiles its own model of the same class with its own backend, run
some calls of the shared model eagerly.

Every instance of one class shares ``forward``'s code object, hence one dynamo cache and one
``recompile_limit`` (8). Threads that waited on the compile lock while another compiled the
shared model do not find its fresh cache entry: dynamo tries again ("Unexpected
recompilation: runtime guards failed even though they passed during recompilation-reason
analysis"); with equal backends that is a redundant recompile, with one backend per thread
the limit is reached and dynamo runs that call eagerly (a warning only). A backend never
sees such a call, so fxprefetch's counters, which count what ran, count nothing for it.

Run: ``python repro/dynamo_first_call_threads.py`` (a few seconds per attempt on the CPU).
Seen on torch 2.13.0: threads with 2 compiled calls of 3, within a few attempts. Work-around:
call the shared model once before starting the threads, or raise
``torch._dynamo.config.recompile_limit``.
"""

import threading

import torch

THREADS = 6
CALLS = 3


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).relu()


compiled_calls = threading.local()


def backend(tag: str):
    def compile_graph(gm, example_inputs):
        def run(*args):
            if tag == "shared":
                compiled_calls.n = getattr(compiled_calls, "n", 0) + 1
            return gm.forward(*args)

        return run

    return compile_graph


def attempt() -> list[int | None]:
    torch._dynamo.reset()
    shared = torch.compile(Model(), backend=backend("shared"))
    barrier = threading.Barrier(THREADS)
    seen: dict[int, int] = {}

    def work(i: int) -> None:
        own = torch.compile(Model(), backend=backend(f"own{i}"))
        barrier.wait()
        x = torch.randn(2, 8)
        own(x)
        for _ in range(CALLS):
            shared(x)
        seen[i] = getattr(compiled_calls, "n", 0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return [seen.get(i) for i in range(THREADS)]


def main() -> None:
    for tries in range(1, 11):  # a race: not every attempt loses it
        counts = attempt()
        print(f"attempt {tries}: compiled calls of the shared model per thread: {counts}")
        if any(c != CALLS for c in counts):
            print(f"some calls of {CALLS} ran eagerly")
            return
    print("every call ran compiled in 10 attempts")


if __name__ == "__main__":
    main()

"""Checks on a compiled sampler's program text: host round trips, decisions, size.

What the standards ask of a cached loop can be read off the program XLA runs:

* :func:`host_round_trips`: host callbacks (``jax.debug.callback``, ``pure_callback``,
  ``io_callback``), sends, receives, infeeds and outfeeds. A sampling program must have none.
* :func:`runtime_decisions`: conditionals, and loops whose trip count XLA does not know (a
  loop of zero or one trips is how the sampler runs a body on the device's decision). A
  schedule known before sampling must compile to a program with none.
* :func:`normalized_size`: the text's length with constants and sizes masked, to show that the
  step count does not grow the program.

Example:
  >>> lowered = jaxcache.lower(plan, seg, noise, cond, solver=s, num_steps=20,
  ...                          policy=jaxcache.IntervalPolicy(3))          # doctest: +SKIP
  >>> host_round_trips(lowered.as_text()), runtime_decisions(lowered.compile().as_text())
  ([], [])                                                                    # doctest: +SKIP
"""

from __future__ import annotations

import re

__all__ = ["host_round_trips", "normalized_size", "runtime_decisions"]

_HOST_PATTERNS = (
    re.compile(r"custom_call\s*@?\"?([\w.]*callback[\w.]*)", re.IGNORECASE),
    re.compile(r"custom_call_target=\"([\w.]*callback[\w.]*)\"", re.IGNORECASE),
    re.compile(r"\bstablehlo\.(send|recv|infeed|outfeed)\b"),
    re.compile(r"\b(send|recv|send-done|recv-done|infeed|outfeed)\("),
)


def host_round_trips(text: str) -> list[str]:
    """The lines of a program (StableHLO or HLO text) that talk to the host.

    Args:
      text: ``lowered.as_text()`` or ``compiled.as_text()``.

    Returns:
      The offending lines, stripped (empty when the program never leaves the device).
    """
    return [
        line.strip()
        for line in text.splitlines()
        if any(p.search(line) for p in _HOST_PATTERNS)
    ]


def runtime_decisions(compiled_text: str) -> list[str]:
    """The control flow of a compiled program that waits on a value computed on the device.

    A ``lax.scan`` compiles to a loop whose trip count XLA knows (``known_trip_count`` in its
    backend config); a decision is a ``conditional`` or a ``while`` without one.

    Args:
      compiled_text: ``lowered.compile().as_text()`` (optimised HLO).

    Returns:
      The deciding instructions' lines, stripped (empty when nothing is decided at run time).
    """
    found = []
    for line in compiled_text.splitlines():
        if re.search(r"\bconditional\(", line):
            found.append(line.strip())
        elif re.search(r"\bwhile\(", line) and "known_trip_count" not in line:
            found.append(line.strip())
    return found


def normalized_size(text: str) -> int:
    """The program text's length with numbers and literal constants masked.

    Two programs that differ only in loop lengths, array sizes and constant tables (the time
    grid of a longer run) have the same normalized size.
    """
    text = re.sub(r"dense<[^>]*>", "dense<>", text)
    text = re.sub(r"constant\(\{[^}]*\}\)", "constant({})", text)
    text = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "0", text)
    return len(text)

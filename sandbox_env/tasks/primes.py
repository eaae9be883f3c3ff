"""Primes: n-th primes, prime counts, next primes, largest prime factors.

The idea: each question needs a sieve, a primality test or a factorisation that takes
thousands to millions of steps, which the python tool runs in well under a second; the host
computes the reference with the same algorithms.
"""

from __future__ import annotations

import bisect
import random
from functools import lru_cache
from typing import Any

from sandbox_env.agent.types import AssistantStep
from sandbox_env.tasks.base import Task, TaskFamily, format_final
from sandbox_env.tasks.scripting import ScriptContext, last_line, line_before_last, python_run

KINDS = ("nth_prime", "prime_count", "next_prime", "largest_prime_factor")


@lru_cache(maxsize=1)
def _sieve(limit: int = 2_000_001) -> bytearray:
    s = bytearray([1]) * limit
    s[0] = s[1] = 0
    for i in range(2, int(limit**0.5) + 1):
        if s[i]:
            s[i * i :: i] = bytearray(len(range(i * i, limit, i)))
    return s


@lru_cache(maxsize=1)
def _primes() -> list[int]:
    return [i for i, isp in enumerate(_sieve()) if isp]


_MR_CODE = """def is_prime(n):
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True
"""

# The reference answers use the very code the teacher runs in the sandbox (one source, not two
# copies that could drift): deterministic Miller-Rabin for n < 3.3e24.
_namespace: dict = {}
exec(_MR_CODE, _namespace)
_is_prime = _namespace["is_prime"]

_SIEVE_CODE = """def sieve(limit):
    s = bytearray([1]) * limit
    s[0] = s[1] = 0
    for i in range(2, int(limit ** 0.5) + 1):
        if s[i]:
            s[i * i::i] = bytearray(len(range(i * i, limit, i)))
    return s
"""


class PrimesFamily(TaskFamily):
    name = "primes"
    tools = ("python",)

    def draw(self, rng: random.Random) -> dict[str, Any]:
        kind = rng.choice(KINDS)
        if kind == "nth_prime":
            return {"kind": kind, "n": rng.randint(1000, 100000)}
        if kind == "prime_count":
            return {"kind": kind, "n": rng.randint(10**4, 2 * 10**6)}
        if kind == "next_prime":
            return {"kind": kind, "n": rng.randint(10**9, 10**15)}
        s = _sieve()
        pool = [rng.randint(2, 200000) for _ in range(200)]
        factors = [q for q in pool if s[q]][: rng.randint(2, 4)]
        n = 1
        for q in factors:
            n *= q
        return {"kind": kind, "n": n}

    def build(self, p: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
        k, n = p["kind"], p["n"]
        if k == "nth_prime":
            return f"What is the {n}th prime number (2 is the 1st)?", str(_primes()[n - 1]), {}
        if k == "prime_count":
            return f"How many prime numbers are there below {n}?", str(bisect.bisect_left(_primes(), n)), {}
        if k == "next_prime":
            m = n + 1
            while not _is_prime(m):
                m += 1
            return f"What is the smallest prime number greater than {n}?", str(m), {}
        m, best, q = n, 1, 2
        while q * q <= m:
            while m % q == 0:
                m, best = m // q, q
            q += 1
        return f"What is the largest prime factor of {n}?", str(max(best, m) if m > 1 else best), {}

    def script(self, task: Task, ctx: ScriptContext):
        k, n = task.params["kind"], task.params["n"]
        if k == "nth_prime":
            plan = (
                f"I need the {n}th prime. By the prime number theorem the n-th prime is below n(ln n + ln ln n) for n >= 6, "
                "so I'll sieve up to that bound and walk the primes in order."
            )
            code = _SIEVE_CODE + f"import math\nn = {n}\nlimit = int(n * (math.log(n) + math.log(math.log(n)))) + 10\nprimes = [i for i, p in enumerate(sieve(limit)) if p]\nprint(len(primes))\nprint(primes[n - 1])"
            what = f"the {n}th prime"
        elif k == "prime_count":
            plan = f"I need the number of primes below {n}. A sieve of Eratosthenes up to {n} counts them exactly in a fraction of a second."
            code = _SIEVE_CODE + f"print(sum(sieve({n})))"
            what = f"the number of primes below {n}"
        elif k == "next_prime":
            plan = (
                f"I need the first prime after {n}. Trial division up to the square root would be slow at this size, "
                "so I'll use a deterministic Miller-Rabin test and step upward from n + 1."
            )
            code = _MR_CODE + f"m = {n} + 1\nwhile not is_prime(m):\n    m += 1\nprint(m)"
            what = f"the smallest prime greater than {n}"
        else:
            plan = f"I need the largest prime factor of {n}. I'll factor it by trial division, dividing out each factor as I find it; whatever is left above 1 at the end is prime."
            code = f"n = {n}\nfactors = []\nq = 2\nwhile q * q <= n:\n    while n % q == 0:\n        factors.append(q)\n        n //= q\n    q += 1\nif n > 1:\n    factors.append(n)\nprint(factors)\nprint(max(factors))"
            what = "the largest prime factor"
        out = yield from python_run(ctx, plan, code)
        value, before = last_line(out), line_before_last(out)
        if k == "nth_prime":
            seen = f"The sieve found {before} primes below its bound, more than {n}, so index {n - 1} exists; it printed {value}."
        elif k == "largest_prime_factor":
            seen = f"The factorisation printed {before}, and its largest entry is {value}."
        else:
            seen = f"The program printed {value}."
        yield AssistantStep(
            f"{seen} That is {what}, computed exactly, so it is the answer.",
            format_final(f"{what[0].upper() + what[1:]} is {value}.", value),
        )

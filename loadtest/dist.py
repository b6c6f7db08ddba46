"""Small distribution specs shared by the origin's knobs.

A spec is a string, the same on the command line and in the control endpoint's JSON:

    fixed:5              always 5
    uniform:1,10         uniform between 1 and 10
    lognormal:5,50       lognormal whose median is 5 and whose 99th percentile is 50

Units are the caller's (milliseconds for latency, bytes for body size).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

_Z99 = 2.3263478740408408  # standard normal quantile at 0.99


@dataclass(frozen=True)
class Dist:
    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str | float) -> Dist:
        if isinstance(spec, (int, float)):
            return cls._check(cls("fixed", float(spec)), str(spec))
        text = str(spec).strip().lower()
        kind, _, rest = text.partition(":")
        if not rest:
            # a bare number means fixed
            try:
                return cls._check(cls("fixed", float(kind)), text)
            except ValueError:
                raise ValueError(
                    f"bad distribution {spec!r}: want fixed:N, uniform:A,B or lognormal:P50,P99"
                ) from None
        try:
            nums = [float(x) for x in rest.split(",")]
        except ValueError:
            raise ValueError(f"bad distribution {spec!r}: numbers expected after {kind}:") from None
        if kind == "fixed" and len(nums) == 1:
            return cls._check(cls("fixed", nums[0]), text)
        if kind == "uniform" and len(nums) == 2:
            return cls._check(cls("uniform", nums[0], nums[1]), text)
        if kind == "lognormal" and len(nums) == 2:
            return cls._check(cls("lognormal", nums[0], nums[1]), text)
        raise ValueError(
            f"bad distribution {spec!r}: want fixed:N, uniform:A,B or lognormal:P50,P99"
        )

    @staticmethod
    def _check(d: Dist, text: str) -> Dist:
        if d.a < 0 or d.b < 0 or not math.isfinite(d.a) or not math.isfinite(d.b):
            raise ValueError(f"bad distribution {text!r}: values must be finite and >= 0")
        if d.kind == "uniform" and d.b < d.a:
            raise ValueError(f"bad distribution {text!r}: uniform needs A <= B")
        if d.kind == "lognormal" and not (0 < d.a <= d.b):
            raise ValueError(f"bad distribution {text!r}: lognormal needs 0 < P50 <= P99")
        return d

    def sample(self, rng: random.Random | None = None) -> float:
        r = rng or random
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return r.uniform(self.a, self.b)
        mu = math.log(self.a)
        sigma = (math.log(self.b) - mu) / _Z99
        return math.exp(r.gauss(mu, sigma))

    def spec(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.a:g}"
        return f"{self.kind}:{self.a:g},{self.b:g}"

"""`voxtune eval`: a fixed, versioned evaluation set and the one table of figures it gives.

from voxtune.eval import load_suite, prepare, evaluate_suite
suite = load_suite("default")
report = evaluate_suite(voxtune.load(), suite, prepare(suite))
print(format_table(report))
"""

from voxtune.eval.report import format_table
from voxtune.eval.run import evaluate_suite
from voxtune.eval.suite import Suite, load_suite, prepare

__all__ = ["Suite", "evaluate_suite", "format_table", "load_suite", "prepare"]

"""pynydus's fuzzing campaign: atheris over every parser of untrusted bytes.

``python -m fuzz list`` names the targets (:mod:`fuzz.targets`); ``python -m fuzz run
TARGET`` fuzzes one (libFuzzer flags after ``--``); ``python -m fuzz campaign`` runs them
all one at a time, with the limits of docs/fuzzing.md, and writes a summary;
``fuzz/run.sh`` installs atheris and runs the campaign at nice 10. Seeds live in
``fuzz/corpus/TARGET/`` (``python -m fuzz seeds`` writes them again from the fixtures);
crashing inputs found and fixed are kept in ``fuzz/regressions/TARGET/`` and replayed
by tests/unit/test_fuzz_targets.py.
"""

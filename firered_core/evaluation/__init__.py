"""Bench evaluation (REDEdit-Bench, GEdit-style, your own JSONL): generate, judge, offline metrics, report.

Modules: :mod:`.benches` (bench definitions as data, JSONL rows), :mod:`.generate` (resumable, sharded generation
with a manifest), :mod:`.judge` + :mod:`.scoring` (OpenAI-compatible judge, robust score parsing), :mod:`.metrics`
(size, pixel shift, unedited-region PSNR / SSIM), :mod:`.aggregate` (means with their counts, failures),
:mod:`.report` (scores.json, HTML, comparison), :mod:`.cli` (``firered-bench``).
"""

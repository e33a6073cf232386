"""The `lmlab-eval` console script: lm-evaluation-harness's command line with lmlab's backend
registered as `--model lmlab` (training/lm_eval_model.py), or one error line saying how to
install the harness where it is missing."""
import sys


def main():
  try:
    from lmlab.training import lm_eval_model
  except ImportError as e:
    if not (e.name or '').startswith('lm_eval'):
      raise
    print("error: lmlab-eval runs the lm-evaluation-harness, which is not installed: "
          "pip install 'lmlab[eval]'", file=sys.stderr)
    sys.exit(1)
  lm_eval_model.command_line()

r"""Print a command exactly as README.md states it, so that CI runs what users are told to run.

  python scripts/readme_commands.py 1      # set-up command 1: install, train on the tiny model
  python scripts/readme_commands.py 2      # set-up command 2: install test deps, run the tests
  python scripts/readme_commands.py eval   # the eval.py command the README gives after them

`.ci/run` reads its commands from here instead of repeating them, so README and CI cannot drift
apart: edit README.md and CI follows (tests/test_packaging.py checks that .ci/run uses all three).
The set-up commands are the lines under the `# 1.` and `# 2.` comments of the README's first
```bash block; the README promises exactly two of them, and anything else is an error here.
"""

from __future__ import annotations

import os
import re
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_commands(path: str = README) -> dict[str, str]:
  """{"1": ..., "2": ..., "eval": ...} from the README at `path`."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  block = re.search(r"^```bash\n(.*?)^```", text, re.S | re.M)
  if block is None:
    raise ValueError(f"{path}: no ```bash block with the set-up commands")
  commands: dict[str, str] = {}
  number = None
  for line in block.group(1).splitlines():
    heading = re.match(r"#\s*(\d+)\.", line)
    if heading:
      number = heading.group(1)
    elif line.strip() and not line.startswith("#"):
      if number is None or number in commands:
        raise ValueError(f"{path}: command {line.strip()!r} in the first ```bash block is not "
                         "the one line under a '# N.' comment")
      commands[number] = line.strip()
  if sorted(commands) != ["1", "2"]:
    raise ValueError(f"{path}: the first ```bash block must hold exactly two set-up commands "
                     f"under '# 1.' and '# 2.', found {sorted(commands)}")
  evaluation = re.search(r"`(python eval\.py [^`]+)`", text)
  if evaluation is None:
    raise ValueError(f"{path}: no `python eval.py ...` command")
  commands["eval"] = evaluation.group(1)
  return commands


def main(argv: list[str]) -> int:
  commands = readme_commands()
  if len(argv) != 2 or argv[1] not in commands:
    print(f"usage: {argv[0]} {{{'|'.join(commands)}}}", file=sys.stderr)
    return 2
  print(commands[argv[1]])
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))

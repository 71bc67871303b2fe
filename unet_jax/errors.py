"""The one exception type the command-line doors turn into a one-line message and exit code."""


class UserError(Exception):
  """Bad input from the user: the message names the problem and what to do about it."""


def first_line(e: BaseException, limit: int = 160) -> str:
  """The first line of an exception's message (its type when empty), for one-line errors."""
  text = str(e).strip().splitlines()
  return text[0][:limit] if text else type(e).__name__

"""The one exception type the command-line doors turn into a one-line message and exit code."""


class UserError(Exception):
  """Bad input from the user: the message names the problem and what to do about it."""

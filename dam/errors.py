"""The exception users see for inputs they can fix (bad mask, bad image, wrong frame count...).

It subclasses ValueError so that callers who already catch ValueError keep working; every
message names the offending input and says what to do instead.
"""


class DamInputError(ValueError):
    """An input given to the toolkit is unusable; the message says which one and how to fix it."""

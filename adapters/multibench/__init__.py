"""deqfusion integration package."""

"""Lethe's HTTP face: the API (`lethe serve`) and the console, over the SDK."""

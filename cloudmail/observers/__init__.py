"""Observers: modules that listen on cloudmail's signals and turn host events into mail."""

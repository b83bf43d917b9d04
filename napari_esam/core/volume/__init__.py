"""Stacks as volumes and time-lapses: objects through slices."""

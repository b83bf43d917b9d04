"""The export section of the 'Segment everything' widget: controller (no Qt) and view."""

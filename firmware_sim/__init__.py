"""Simulated hardware: alarm posts on gpiozero mock pins, whole fleets in one process."""

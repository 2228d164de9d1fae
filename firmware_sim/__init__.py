"""Simulated hardware: alarm posts on gpiozero mock pins, whole fleets in one process
(:mod:`firmware_sim.fleet`), and the IO board's firmware on a pseudo-terminal
(:mod:`firmware_sim.ioboard`)."""

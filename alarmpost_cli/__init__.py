"""The ``alarmpost`` command."""

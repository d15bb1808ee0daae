"""One module per ``capkeeper`` command: HELP, DESCRIPTION, add_arguments and run."""

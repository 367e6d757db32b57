"""The cbir command (cli.main): it parses arguments, loads settings and runs a verb's flow; `cbir search`
and `cbir web` answer from the searcher in this process, without a flow run."""

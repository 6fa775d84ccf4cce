from textseg_cli.cli import main

main()

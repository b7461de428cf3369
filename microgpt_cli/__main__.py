from microgpt_cli.cli import main

main()

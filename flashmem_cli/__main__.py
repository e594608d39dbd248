from flashmem_cli.cli import main

main()

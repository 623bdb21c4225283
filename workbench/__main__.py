from servebench.workbench.cli import main

main()

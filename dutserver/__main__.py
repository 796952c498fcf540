from dutserver.cli import main

main()

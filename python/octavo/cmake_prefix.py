"""`python -m octavo.cmake_prefix` prints the CMAKE_PREFIX_PATH for find_package(octavo)."""

from octavo import cmake_prefix

if __name__ == "__main__":
    print(cmake_prefix())

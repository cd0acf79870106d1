#include <iostream>

#include <octavo/error.h>
#include <octavo/version.h>

int main() {
  octavo::BuildInfo info = octavo::build_info();
  std::cout << "octavo " << info.version << ", backends:";
  for (const auto& backend : info.backends) std::cout << ' ' << backend;
  std::cout << '\n';
  return info.backends.empty() || info.backends.front() != "cpu";
}

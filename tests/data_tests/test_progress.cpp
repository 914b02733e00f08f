#include <gtest/gtest.h>

#include <cstdio>

#include "ft/util/progress.h"

TEST(Progress, FormatsDurationsAndLines) {
  EXPECT_EQ(ft::Progress::format_duration(5), "5s");
  EXPECT_EQ(ft::Progress::format_duration(200), "3m20s");
  EXPECT_EQ(ft::Progress::format_duration(3720), "1h02m");
  EXPECT_EQ(ft::Progress::format_duration(-1), "?");
  ft::Progress p("prepare", 200, "docs", nullptr);
  const std::string line = p.line(50, "skipped 0");
  EXPECT_NE(line.find("[#####...............] 25.0% 50.0/200.0 docs"), std::string::npos) << line;
  EXPECT_NE(line.find("ETA"), std::string::npos) << line;
  EXPECT_NE(line.find("skipped 0"), std::string::npos) << line;
}

TEST(Progress, WritesPlainLinesToFiles) {
  std::FILE* f = std::tmpfile();
  ft::Progress p("step", 0, "tokens", f, 0.0);
  p.update(10);
  p.update(20, "loss 2.0");
  p.finish();
  std::rewind(f);
  char buf[512];
  int lines = 0;
  while (std::fgets(buf, sizeof buf, f)) ++lines;
  std::fclose(f);
  EXPECT_EQ(lines, 3);  // one line per draw, no carriage returns
}

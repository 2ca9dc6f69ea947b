/* A target that is not CPython: opens each file named on its command line, prints
 * "FD PATH" for each, and exits without closing them (process exit releases them). */
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        int fd = open(argv[i], O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0) {
            perror(argv[i]);
            return 1;
        }
        printf("%d %s\n", fd, argv[i]);
    }
    int scratch = open("/dev/null", O_RDONLY); /* born and closed: no leak */
    close(scratch);
    return 0;
}

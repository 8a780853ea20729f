// Read a VHD chain with Xen Orchestra's VHD library (vhd-lib), as XO reads its own backups:
// from the newest file, following each differencing header's parent name (relative to the
// file) down to the dynamic full, and write the chain as one synthetic dynamic VHD.
//     node read_chain.js NEWEST.vhd OUT.vhd
'use strict'
const fs = require('fs')
const { createSyntheticStream } = require('vhd-lib')

// the file-system handler vhd-lib expects (@xen-orchestra/fs's interface, local files only)
const handler = {
  async openFile (path, flags) { return fs.openSync(require('path').resolve('/', path), flags) },
  async closeFile (fd) { fs.closeSync(fd) },
  async getSize (fd) { return fs.fstatSync(fd).size },
  async read (fd, buffer, position) {
    const bytesRead = fs.readSync(fd, buffer, 0, buffer.length, position)
    return { bytesRead, buffer }
  },
}

async function main () {
  const [newest, out] = process.argv.slice(2)
  // vhd-lib resolves parent names against '/', from the path given: pass it absolute
  const stream = await createSyntheticStream(handler, require('path').resolve(newest).slice(1))
  await new Promise((resolve, reject) => {
    stream.pipe(fs.createWriteStream(out)).on('finish', resolve).on('error', reject)
    stream.on('error', reject)
  })
}
main().catch(error => { console.error(error); process.exit(1) })
